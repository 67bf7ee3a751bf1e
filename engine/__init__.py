"""LoRA Lab's engine: models, data, training, analysis, jobs (docs/ARCHITECTURE.md).

    engine.core   stdlib (+ storage, psutil, huggingface_hub): config, anatomy, estimate, spectrum, runs,
                  export, jobs, launch, chat client. The web server imports only this part.
    engine.ml     torch, transformers, peft: model, data, train, spectra, generate, merge.
    engine.cli    the command line (`python -m engine`, `loralab`).

Nothing is re-exported here, so `import engine.core.config` stays light.
"""
