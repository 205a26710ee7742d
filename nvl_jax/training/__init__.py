"""Stage-1 training: state on the mesh, the jitted steps, checkpoints, the loop."""
