"""Learning the gates of a frozen model (DuoAttention's objective, with segtrain's segment attention).

Teacher: the same model with every KV head ``all`` (full causal attention at any segment size),
run under ``no_grad`` once per batch. Student: every slot filled with :class:`GatedAttention`.
Loss: the mean squared difference of the final (normed) hidden states at the answer positions,
averaged over channels and positions, plus ``l1`` times the mean gate. Only the gates train
(Adam, then clamped to ``[0, 1]``): a head whose output does not change when it loses history has
no distillation gradient, so the L1 term takes its gate to 0; a head that retrieves keeps it high.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from segtrain.attention import attention_slots, filled_slots
from segtrain.calibrate.gated import GatedAttention, HeadGates, with_policy
from segtrain.checkpoint.calibration import check_bounded

__all__ = ["GateLearner", "answer_hidden"]


def answer_hidden(model: nn.Module, input_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """Final (normed) hidden states ``[n, hidden]`` of a :class:`LlamaForCausalLM` at the ``answer_mask`` positions."""
    return model.model.norm(model.model.hidden_states(input_ids)[answer_mask])


class GateLearner:
    """One gate per (layer, KV head) of ``model`` (frozen here), learned by :meth:`step`; resumable via
    :meth:`state_dict` / :meth:`load_state_dict` (plain lists: JSON-able, exact for float32)."""

    def __init__(self, model: nn.Module, bounded: str, *, lr: float = 0.02, l1: float = 0.05, gate_dtype=torch.float32):
        slots = attention_slots(model)
        layers = [original.layer for _, original in slots]
        if layers != list(range(len(slots))):
            raise ValueError(f"attention slots must be layers 0..{len(slots) - 1}, got {layers}")
        self.model, self.bounded, self.l1 = model.requires_grad_(False), check_bounded(bounded), float(l1)
        device = next(model.parameters()).device
        self.gates = HeadGates(len(slots), len(slots[0][1].policy), dtype=gate_dtype).to(device)
        self.optimizer = torch.optim.Adam(self.gates.parameters(), lr=lr)

    def teacher(self, input_ids: Tensor, answer_mask: Tensor) -> Tensor:
        with torch.no_grad(), filled_slots(self.model, lambda o: with_policy(o, "all")):
            return answer_hidden(self.model, input_ids, answer_mask)

    def step(self, input_ids: Tensor, answer_mask: Tensor) -> dict[str, float]:
        """One optimizer step on a batch: ``input_ids [B, T]``, ``answer_mask [B, T]`` (bool, True where a
        position's next token is an answer token). Returns the distillation loss and the mean gate."""
        answer_mask = answer_mask.bool()
        if not answer_mask.any():
            raise ValueError("answer_mask selects no position: nothing to distill")
        target = self.teacher(input_ids, answer_mask)
        with filled_slots(self.model, lambda o: GatedAttention(o, self.bounded, self.gates)):
            student = answer_hidden(self.model, input_ids, answer_mask)
            dtype = torch.promote_types(student.dtype, torch.float32)
            distill = (student.to(dtype) - target.to(dtype)).pow(2).mean(-1).mean()
            mean_gate = self.gates.alpha.abs().mean()
            self.optimizer.zero_grad(set_to_none=True)
            (distill + self.l1 * mean_gate).backward()  # inside the block: recomputation sees the same slots
        self.optimizer.step()
        self.gates.clamp_()
        return {"distill": distill.item(), "mean_gate": mean_gate.item()}

    def state_dict(self) -> dict:
        state = self.optimizer.state_dict()["state"].get(0, {})
        return {"gates": self.gates.tolist(), "adam": {k: v.tolist() for k, v in state.items()}}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.gates.alpha.copy_(torch.tensor(state["gates"], dtype=self.gates.alpha.dtype))
        saved = self.optimizer.state_dict()
        if state.get("adam"):
            saved["state"] = {0: {k: torch.tensor(v, dtype=torch.float32) for k, v in state["adam"].items()}}
        self.optimizer.load_state_dict(saved)
