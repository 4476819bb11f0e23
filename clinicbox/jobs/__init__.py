"""The jobs room: plain task functions (backup, restore test, …) and the scheduler that runs them."""
