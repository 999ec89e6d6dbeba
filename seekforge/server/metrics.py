"""Prometheus metrics of one server, in a registry of its own (several apps can live in one process).

HTTP-side figures (requests by endpoint and status) are counted by the app; token counts, latencies
and the engine's state by the engine loop, which owns the model. Latencies are measured where the
tokens leave the engine: time to first token from the request's arrival, inter-token latency as the
gap between a completion's outputs divided by the tokens they carried (a speculative step can emit
several at once).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        label = {"model_name": model_name}
        self.requests = Counter("seekforge_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("seekforge_request_finished", "Generations ended, by finish reason "
                                "(stop, length, abort = client gone, error)", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("seekforge_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("seekforge_generation_tokens", "Tokens generated", registry=r)
        self.cached_prompt_tokens = Counter("seekforge_prefix_cache_hit_tokens",
                                            "Prompt tokens served from the prefix cache", registry=r)
        self.ttft = Histogram("seekforge_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("seekforge_inter_token_latency_seconds", "Time per output token after the first",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("seekforge_request_latency_seconds", "Time from arrival to the last token",
                             buckets=_TTFT_BUCKETS, registry=r)
        self.waiting = Gauge("seekforge_requests_waiting", "Admitted requests without a token yet (queue length)",
                             registry=r)
        self.running = Gauge("seekforge_requests_running", "Requests producing tokens", registry=r)
        self.cache_usage = Gauge("seekforge_cache_usage_ratio", "Fraction of paged latent-cache blocks held "
                                 "by live sequences", registry=r)
        self.cache_blocks = Gauge("seekforge_cache_blocks", "Paged latent-cache blocks in total", registry=r)
        self.prefix_hit_rate = Gauge("seekforge_prefix_cache_hit_rate", "Prompt tokens found in the prefix "
                                     "cache over prompt tokens looked up, since start", registry=r)
        self.preemptions = Gauge("seekforge_preemptions", "Sequences preempted (recomputed) since start", registry=r)
        self.prefill_tokens = Gauge("seekforge_prefill_tokens_computed", "Tokens prefilled (prompts and recomputes, "
                                    "less what the prefix cache's tiers held) since start", registry=r)
        self.kv_tier_used = Gauge("seekforge_kv_tier_used_bytes", "Bytes the KV tiers under the prefix cache hold, "
                                  "by tier (cpu, disk)", ["tier"], registry=r)
        self.kv_tier_capacity = Gauge("seekforge_kv_tier_capacity_bytes", "Bytes each KV tier under the prefix "
                                      "cache may hold, by tier (cpu, disk)", ["tier"], registry=r)
        self.kv_tier_hit_rate = Gauge("seekforge_kv_tier_hit_rate", "Prompt tokens a KV tier supplied over the prompt "
                                      "tokens the tiers above it did not hold, since start, by tier (gpu, cpu, disk)",
                                      ["tier"], registry=r)
        self.kv_disk_corrupt = Gauge("seekforge_kv_disk_corrupt_blocks", "Disk-tier blocks found torn or corrupt "
                                     "(deleted and recomputed) since start", registry=r)
        self.async_steps = Gauge("seekforge_async_steps", "Decode steps launched before the last step's tokens "
                                 "reached the host (async scheduling) since start", registry=r)
        self.spec_acceptance = Gauge("seekforge_spec_decode_acceptance_rate", "MTP speculative decoding: share "
                                     "of drafts kept, by draft position", ["position"], registry=r)
        self.spec_tokens_per_step = Gauge("seekforge_spec_decode_tokens_per_step", "MTP speculative decoding: "
                                          "tokens emitted per verification step", registry=r)
        self.expert_tokens = Counter("seekforge_expert_tokens", "Tokens routed to each expert of each MoE layer "
                                     "(main model forwards)", ["layer", "expert"], registry=r)
        self.expert_imbalance = Gauge("seekforge_expert_load_imbalance", "Max over mean of the tokens routed "
                                      "per expert since the previous update, by MoE layer", ["layer"], registry=r)
        self.routed_experts = Gauge("seekforge_routed_experts", "Routed experts a token runs with now, under "
                                    "adaptive expert activation (--adaptive-experts)", registry=r)
        self.routed_experts_seconds = Counter("seekforge_routed_experts_seconds", "Engine time spent at each routed "
                                              "top-k (adaptive expert activation)", ["k"], registry=r)
        self._seconds_at_k: dict[int, float] = {}
        self.engine_errors = Counter("seekforge_engine_errors", "Engine steps that raised (their requests failed)",
                                     registry=r)
        Gauge("seekforge_model_info", "The served model", list(label), registry=r).labels(**label).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def record_engine_stats(self, stats: dict) -> None:
        """The figures of LLM.stats(): cache occupancy, prefix hits, prefill tokens, preemptions, async steps,
        speculative acceptance, and the KV tiers' use and hits."""
        total = stats["num_blocks"]
        self.cache_blocks.set(total)
        self.cache_usage.set((total - stats["free_blocks"]) / total if total else 0.0)
        self.prefix_hit_rate.set(stats["prefix_cache_hit_rate"])
        self.preemptions.set(stats["preemptions"])
        self.prefill_tokens.set(stats["prefill_tokens_computed"])
        for tier, figures in stats.get("kv_tiers", {}).items():
            self.kv_tier_hit_rate.labels(tier=tier).set(figures["hit_rate"])
            if tier != "gpu":
                self.kv_tier_used.labels(tier=tier).set(figures["used_bytes"])
                self.kv_tier_capacity.labels(tier=tier).set(figures["capacity_bytes"])
            if tier == "disk":
                self.kv_disk_corrupt.set(figures["corrupt_blocks"])
        self.async_steps.set(stats["async_steps"])
        spec = stats.get("speculative")
        if spec:
            for j, rate in enumerate(spec["acceptance_rate"]):
                self.spec_acceptance.labels(position=str(j + 1)).set(rate)
            self.spec_tokens_per_step.set(spec["mean_tokens_per_step"])
        adaptive = stats.get("adaptive_experts")
        if adaptive:
            self.routed_experts.set(adaptive["topk"])
            for k, seconds in adaptive["seconds_at_k"].items():
                self.routed_experts_seconds.labels(k=str(k)).inc(seconds - self._seconds_at_k.get(k, 0.0))
                self._seconds_at_k[k] = seconds

    def record_expert_load(self, per_layer: dict[int, list[float]]) -> None:
        for layer, counts in per_layer.items():
            for expert, count in enumerate(counts):
                if count:
                    self.expert_tokens.labels(layer=str(layer), expert=str(expert)).inc(count)
            total = sum(counts)
            if total:
                self.expert_imbalance.labels(layer=str(layer)).set(max(counts) * len(counts) / total)
