"""rdv: peer-to-peer telepresence for LeRobot arms. One subpackage per supervised process."""

__version__ = "0.1.0"
