"""The sweep report as a function of the sweep dir: `collect` reads every job's run dir, `stats`
gives means, deviations and Welch intervals over seeds, `curves` reads the eval-loss curves from
the TensorBoard events, `plot` draws sweep.png, `report` writes sweep.md/.csv/.png, and `launch`
holds what a sweep checks when it starts and what each job takes (the same command resumes a sweep
dir; parallel jobs share the cores). `trainer.sweep` is the entry point and the Hydra callback."""
