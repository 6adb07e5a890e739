"""fusedopt's Triton kernels, installed as ``fusedopt.kernels``: one file per optimizer, each with
its kernels and their launcher; ``multi_tensor`` holds what they share."""
