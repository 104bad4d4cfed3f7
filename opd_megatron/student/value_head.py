"""GAE-OPD's value head: `V_phi(s_t)` regressed on log-ratio returns beside the student [Survey].

A linear map of the student's final hidden states (detached: the value loss never moves the student) on the last
pipeline stage. Its input is captured with a forward pre-hook on the output layer, so it reads the same `[S, B, H]`
hidden states the logits come from (replicated on the TP ranks without sequence parallelism, so every TP rank holds
the same head and takes the same step). Its own Adam optimizer steps after the student's; gradients are summed over
tokens in the loss, then here divided by the global token count and summed over data-parallel ranks: the gradient of
the mean value loss over the global batch, whatever the data-parallel split.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state


class ValueHead(torch.nn.Module):
    def __init__(self, hidden_size: int, lr: float, device: torch.device):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1, device=device)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        self.hidden: Optional[torch.Tensor] = None
        self._hook = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden `[B, S, H]` -> values `[B, S, 1]`."""
        return self.linear(hidden)

    def attach(self, module) -> None:
        """Capture the input of `module.output_layer` (`[S, B, H]`) as `self.hidden` `[B, S, H]`, detached."""
        def hook(_layer, inputs):
            self.hidden = inputs[0].detach().transpose(0, 1)
        self._hook = module.output_layer.register_forward_pre_hook(hook)

    def step(self, total_tokens: float) -> None:
        """The gradient of the global batch's mean value loss (token sums / global token count, summed over the
        data-parallel ranks), then step."""
        group = parallel_state.get_data_parallel_group()
        for param in self.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            param.grad /= max(total_tokens, 1.0)
            if dist.get_world_size(group) > 1:
                dist.all_reduce(param.grad, group=group)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)

    def state(self) -> dict:
        return {"weights": self.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load(self, state: dict) -> None:
        self.load_state_dict(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
