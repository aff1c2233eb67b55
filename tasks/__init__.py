"""One adapter per transfer task; `tasks.registry` lists them all."""
