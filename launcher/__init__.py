"""The layer in front of DeepSpeed's runner: hostfile and config checks, and the launch command.

Nothing in this package imports torch, so checks run in a fraction of a second on a head node.
"""
