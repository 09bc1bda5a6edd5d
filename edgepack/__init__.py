"""The `edgepack` command, assembled: the packager's and the fleet side's commands in one group,
plus what uses both (the demo, the fleet simulator). The only package allowed to import the
packager, the agent and the fleet side together (import-linter keeps it so: see setup.cfg)."""
