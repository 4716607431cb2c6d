"""posttrain: SFT, DPO, reward models (BT / GPM), GPO and RLVR on one DeepSpeed backend and one vLLM rollout service.

Importing the package has no side effects: no distributed init, no engine start, no downloads.
"""

__version__ = "0.1.0"
