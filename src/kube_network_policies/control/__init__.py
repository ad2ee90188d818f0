"""The control process's parts, wired by agent.py: the packet workers as one replicated state
(workers.py: generations, the apply barrier, restarts) and the ruleset kept in the kernel
(keeper.py: syncs, the accept cache, checks and restores)."""
