"""Reinforcement learning and preference optimisation on the nodes (GRPO, DPO, SimPO) with TRL's trainers
under the same launcher, checkpoint layout and markers as SFT. See training/rl/config.py for the settings."""
