"""Put on PYTHONPATH by tests/test_distributed.py: every Python process of the launch imports it at start. With
OMNITUNE_TEST_ROUTING_APART=1, the Thinker's router sends every token of process r to experts r*k .. r*k+k-1 (k =
top-k), so no two processes use one expert: an engine that gathered or reduced only the experts a process used
would wait forever. The router's weights still get gradients (the chosen experts' softmax)."""
import os

if os.environ.get("OMNITUNE_TEST_ROUTING_APART") == "1":
    import sys

    import torch
    import torch.nn.functional as F
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as qwen

    def forward(self, hidden_states):
        logits = F.linear(hidden_states, self.weight)
        rank = int(os.environ.get("RANK", "0"))
        chosen = torch.arange(rank * self.top_k, (rank + 1) * self.top_k, device=logits.device)
        indices = chosen.expand(logits.shape[0], -1)
        scores = torch.softmax(logits.float().gather(-1, indices), dim=-1).to(logits.dtype)
        if not getattr(forward, "said", False):
            print(f"routing apart: process {rank} uses experts {chosen.tolist()}", file=sys.stderr, flush=True)
            forward.said = True
        return logits, scores, indices

    qwen.Qwen3OmniMoeThinkerTextTopKRouter.forward = forward
