"""Training tests run tiny models: one torch thread each avoids oversubscribing a shared CPU."""
import torch

torch.set_num_threads(1)
