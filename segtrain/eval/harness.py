"""lm-evaluation-harness backend: any lm-eval task under segtrain's execution modes.

    segtrain-lm-eval --model segtrain --model_args pretrained=DIR,mode=segmented --tasks hellaswag
    python -m segtrain.eval.harness --model segtrain --model_args pretrained=DIR,mode=full,segment_size=2048 ...

``segtrain-lm-eval`` is lm-eval's own command line (``lm_eval``'s arguments, all of them) with the
``segtrain`` model registered first. lm-eval 0.4.x resolves ``--model NAME`` in an in-process registry
that only its built-in models fill: it discovers no external packages (no entry points; the plugin
registration of lm-eval PR #4013 came after 0.4.13), so a plain ``lm_eval --model segtrain`` cannot
find the class. The wrapper imports this module (``@register_model("segtrain")``) and hands over to
``lm_eval``'s CLI. From Python, ``import segtrain.eval.harness`` before ``lm_eval.simple_evaluate(model="segtrain")``.

Model arguments: ``pretrained`` (a segtrain model dir, a run's checkpoints or an HF Llama dir), ``mode``
(``segmented`` (default) or ``full``), ``segment_size`` and ``policy`` (segmented overrides; the policy in
``convert --policy`` syntax, e.g. ``policy=sink:4+window:1024``), ``tokenizer``, ``device``, ``dtype``,
``batch_size``, ``max_length`` (default: the model's ``max_position_embeddings``), ``max_gen_toks``.
Scores come from the parallel forward, which equals segmented prefill; generation runs the segmented
engine (prefill, then decoding with the per-head KV cache).
"""

from __future__ import annotations

import sys

import lm_eval.models  # noqa: F401  (lm-eval registers its built-in models only into an empty registry: fill it first)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from segtrain.progress import show_progress

__all__ = ["SegtrainLM", "main"]


@register_model("segtrain")
class SegtrainLM(TemplateLM):
    """A segtrain model for lm-eval: loglikelihood, loglikelihood_rolling and generate_until."""

    def __init__(
        self,
        pretrained: str,
        mode: str = "segmented",
        segment_size: int | None = None,
        policy: str | None = None,
        tokenizer: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **unused,
    ):
        super().__init__()
        from segtrain.checkpoint.hf import parse_policy_arg
        from segtrain.checkpoint.open import torch_dtype
        from segtrain.data.tokenizer import load_tokenizer
        from segtrain.eval.load import load_model
        from segtrain.eval.modes import executed_as, parse_modes

        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval passes --device (default cuda) even without a GPU
        self._device = torch.device(device)
        dtype = torch_dtype(dtype, "dtype") or (torch.bfloat16 if self._device.type == "cuda" else torch.float32)
        model, found = load_model(pretrained, device=self._device, dtype=dtype)
        self.max_length = int(max_length or model.config.max_position_embeddings)
        policy = parse_policy_arg(str(policy)) if policy is not None else None
        (self.mode,) = parse_modes(mode, segment_size=int(segment_size) if segment_size else None, policy=policy)
        self.model = executed_as(model, self.mode, self.max_length)
        source = tokenizer or found
        if source is None:
            raise ValueError(f"tokenizer: {pretrained} holds no tokenizer; pass tokenizer=PATH in --model_args")
        self.tokenizer = load_tokenizer(source)
        self.batch_size = 1 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    # ---- tokenization ------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "source", "segtrain"))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = list(self.tokenizer.encode(string))
        return ([self.prefix_token_id] if add_special_tokens else []) + ids

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    # ---- scoring -----------------------------------------------------------------------------

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation given its context, and whether greedy decoding gives it.

        Inputs longer than ``max_length`` keep their last ``max_length`` tokens (lm-eval's convention)."""
        results: list[tuple[float, bool]] = []
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))  # long first
        out: dict[int, tuple[float, bool]] = {}
        for a in show_progress(range(0, len(order), self.batch_size), enabled=not disable_tqdm, desc="segtrain loglikelihood"):
            batch = [requests[i] for i in order[a : a + self.batch_size]]
            rows, spans = [], []
            for _, context, continuation in batch:
                whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
                ids = whole[:-1]
                n = len(continuation)
                rows.append(ids)
                spans.append((len(ids) - n, len(ids), whole[-n:]))
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = torch.tensor(row)
            cont = max(e - s for s, e, _ in spans)
            index = torch.tensor([[min(s + k, e - 1) for k in range(cont)] for s, e, _ in spans])
            logits = self.model(ids.to(self._device), logits_positions=index.to(self._device))
            logprobs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1).cpu()  # float64 stays
            for r, (s, e, target) in enumerate(spans):
                lp = logprobs[r, : e - s]
                tgt = torch.tensor(target)
                out[order[a + r]] = (float(lp.gather(-1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all()))
        results = [out[i] for i in range(len(requests))]
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents: disjoint windows of ``max_length`` tokens, each with its context."""
        out = []
        for request in show_progress(requests, enabled=not disable_tqdm, desc="segtrain rolling"):
            (text,) = request.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            ]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation through the segmented engine, cut at the first stop string."""
        from segtrain.inference import SegmentedEngine

        engine = SegmentedEngine(self.model)
        out = []
        for request in show_progress(requests, enabled=not disable_tqdm, desc="segtrain generate"):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            prompt = self.tok_encode(context, add_special_tokens=True)[-max(1, self.max_length - max_new) :]
            tokens = engine.generate([prompt], max_new_tokens=max_new, stop_tokens=(self.eot_token_id,)).tokens[0]
            text = self.tok_decode(tokens)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> None:
    """``lm_eval``'s command line with the ``segtrain`` model registered (see the module docstring)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
