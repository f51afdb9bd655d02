"""rnnscale.launch: how processes start (the `rnnscale` command); the work is train.run(cfg)."""
