"""The fleet simulator: many devices in one process through the agent's real update path."""
from fleet.sim.device import Fault, SimDevice, SimModel
from fleet.sim.simulator import Misbehaviour, SimSettings, Simulator, synthetic_bundle

__all__ = ["Fault", "Misbehaviour", "SimDevice", "SimModel", "SimSettings", "Simulator", "synthetic_bundle"]
