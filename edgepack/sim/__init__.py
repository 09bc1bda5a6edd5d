"""The fleet simulator: many devices in one process through the agent's real update path.

Import from `edgepack.sim.simulator` / `edgepack.sim.device`: they load the agent's update code, which
`edgepack` itself must not pay for (or depend on) unless a simulation runs."""
