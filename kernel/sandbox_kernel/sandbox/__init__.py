"""How a sandbox process is started, confined and watched."""
