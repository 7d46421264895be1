"""Prometheus metrics of one server (its own registry, so two apps in one process never share counters).

Latency figures are the engine's own record of each request (runtime.streaming.StreamTimings, the paper's
Table 2 rows); requests are counted by endpoint and outcome; queue depth and slots in use are read from the
scheduler when /metrics is scraped."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FRAME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.08, 0.16, 0.5)
RTF_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0)
OUTCOMES = ("ok", "cancelled", "disconnected", "error", "rejected", "shutdown")


class Metrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.first_token = Histogram("omni_rt_time_to_first_token_seconds", "Request start to first text token",
                                     buckets=LATENCY_BUCKETS, registry=registry)
        self.first_packet = Histogram("omni_rt_time_to_first_audio_seconds",
                                      "Request start to first audio packet out", buckets=LATENCY_BUCKETS,
                                      registry=registry)
        self.rtf = Histogram("omni_rt_real_time_factor", "Wall time / seconds of speech, per request",
                             buckets=RTF_BUCKETS, registry=registry)
        self.stage = Histogram("omni_rt_stage_seconds", "Per-request stage times (Table 2 rows)", ["stage"],
                               buckets=LATENCY_BUCKETS, registry=registry)
        self.frame = Histogram("omni_rt_frame_seconds", "Per-frame times of the code predictor and Code2Wav",
                               ["stage"], buckets=FRAME_BUCKETS, registry=registry)
        self.requests = Counter("omni_rt_requests", "Requests by endpoint and outcome", ["endpoint", "outcome"],
                                registry=registry)
        self.queue_depth = Gauge("omni_rt_queue_depth", "Requests admitted and waiting for a slot",
                                 registry=registry)
        self.slots_in_use = Gauge("omni_rt_slots_in_use", "Scheduler slots holding a session", registry=registry)
        self.slots_total = Gauge("omni_rt_slots_total", "Scheduler slots", registry=registry)
        self.open_requests = Gauge("omni_rt_open_requests", "Requests admitted by the server and not finished",
                                   registry=registry)

    def observe(self, timings) -> None:
        """One finished request's StreamTimings."""
        if timings.thinker_first_token is not None:
            self.first_token.observe(timings.thinker_first_token)
        if timings.first_packet is not None:
            self.first_packet.observe(timings.first_packet)
        if timings.rtf is not None:
            self.rtf.observe(timings.rtf)
        for stage in ("preprocess", "thinker_first_token", "talker_first_frame", "first_packet", "total"):
            value = getattr(timings, stage)
            if value is not None:
                self.stage.labels(stage).observe(value)
        for stage, values in (("code_predictor", timings.code_predictor_per_frame),
                              ("code2wav", timings.code2wav_per_frame)):
            for value in values:
                self.frame.labels(stage).observe(value)

    def count(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint, outcome).inc()

    def render(self, slots: dict) -> bytes:
        self.queue_depth.set(slots["waiting"])
        self.slots_in_use.set(slots["in_use"])
        self.slots_total.set(slots["total"])
        self.open_requests.set(slots["open_requests"])
        return generate_latest(self.registry)
