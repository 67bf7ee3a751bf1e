"""LoRA Lab's engine: models, data, training, analysis, jobs.

torch is imported only by model, data, train, spectra, generate and anatomy (and the CLI subcommands
that use them). config, estimate, events, home, jobs and chat are stdlib-only so the web server can use
them. Nothing is re-exported here, so `import engine.config` stays light.
"""
