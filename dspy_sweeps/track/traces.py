"""MLflow traces of a trial's test evaluation: one trace per recorded example (`records.py`),
a root span for the example (inputs, prediction, gold, score) and an LLM span per LM call
(messages, answer, tokens, cost), linked to the trial's run and its LoggedModel.

The spans are built here and written through a `TracingClient` for the sweep's URI, the way
MLflow's own exporter writes them (spans, then the trace's info, then the span data as an
artifact where the store keeps spans apart); MLflow's fluent tracing would send them to the
process-wide tracking URI, which the platform never sets.
"""

from __future__ import annotations

import json
import random
from typing import Any

from dspy_sweeps.records import ExampleTrace, LMCallRecord

PREVIEW_CHARS = 1000


def log_traces(
    uri: str, experiment_id: str, run_id: str, model_id: str | None, examples: list[ExampleTrace], tags: dict[str, str]
) -> list[str]:
    """Write one trace per example; returns their trace ids."""
    from mlflow.tracing.client import TracingClient

    client = TracingClient(uri)
    return [_log_one(client, experiment_id, run_id, model_id, example, tags) for example in examples]


def _log_one(
    client: Any, experiment_id: str, run_id: str, model_id: str | None, example: ExampleTrace, tags: dict[str, str]
) -> str:
    from mlflow.entities import TraceData, TraceInfo, TraceLocation, TraceState
    from mlflow.tracing.constant import SpansLocation, TraceMetadataKey, TraceTagKey
    from mlflow.tracing.utils import generate_mlflow_trace_id_from_otel_trace_id

    otel_trace_id = random.getrandbits(128)
    trace_id = generate_mlflow_trace_id_from_otel_trace_id(otel_trace_id)
    outputs = {"prediction": example.prediction, "gold": example.gold, "score": example.score}
    root_id = random.getrandbits(64)
    spans = [
        _span(
            trace_id, otel_trace_id, root_id, None, f"test example {example.index}", "CHAIN",
            example.start_ns, example.end_ns, example.inputs, outputs, example.error,
            {"dspy_sweeps.example_index": example.index, "dspy_sweeps.score": example.score},
        )
    ]  # fmt: skip
    spans += [_call_span(trace_id, otel_trace_id, root_id, call) for call in example.calls]
    tokens = {
        "input_tokens": sum(c.prompt_tokens for c in example.calls),
        "output_tokens": sum(c.completion_tokens for c in example.calls),
    }
    tokens["total_tokens"] = tokens["input_tokens"] + tokens["output_tokens"]
    metadata = {
        TraceMetadataKey.SOURCE_RUN: run_id,
        TraceMetadataKey.TOKEN_USAGE: json.dumps(tokens),
        TraceMetadataKey.INPUTS: _preview(example.inputs),
        TraceMetadataKey.OUTPUTS: _preview(outputs),
        **({TraceMetadataKey.MODEL_ID: model_id} if model_id else {}),
    }
    info = TraceInfo(
        trace_id=trace_id,
        trace_location=TraceLocation.from_experiment_id(experiment_id),
        request_time=example.start_ns // 1_000_000,
        execution_duration=max((example.end_ns - example.start_ns) // 1_000_000, 0),
        state=TraceState.ERROR if example.error else TraceState.OK,
        request_preview=_preview(example.inputs),
        response_preview=_preview(outputs),
        trace_metadata=metadata,
        tags={**tags, "lm_calls": str(len(example.calls))},
    )
    try:
        client.log_spans(experiment_id, spans)
        stored_with_spans = True
    except NotImplementedError:  # a store that keeps spans only as the trace's artifact
        stored_with_spans = False
    returned = client.start_trace(info)
    if not stored_with_spans or returned.tags.get(TraceTagKey.SPANS_LOCATION) != SpansLocation.TRACKING_STORE.value:
        client._upload_trace_data(returned, TraceData(spans=spans))  # what MLflow's exporter does (mlflow_v3.py)
    return returned.trace_id


def _call_span(trace_id: str, otel_trace_id: int, parent: int, call: LMCallRecord) -> Any:
    usage = {
        "input_tokens": call.prompt_tokens,
        "output_tokens": call.completion_tokens,
        "total_tokens": call.prompt_tokens + call.completion_tokens,
    }
    attributes = {
        "mlflow.chat.tokenUsage": usage,
        "mlflow.llm.model": call.model,
        "mlflow.llm.cost": {"input_cost": 0.0, "output_cost": 0.0, "total_cost": call.cost_usd},
        "cost_usd": call.cost_usd,
        "gateway.served": call.served or "unknown",  # sent to the endpoint, from the cache, or merged
    }
    return _span(
        trace_id, otel_trace_id, random.getrandbits(64), parent, f"LM {call.model}", "CHAT_MODEL",
        call.start_ns, call.end_ns or call.start_ns, {"messages": call.messages}, call.outputs, call.error, attributes,
    )  # fmt: skip


def _span(
    trace_id: str,
    otel_trace_id: int,
    span_id: int,
    parent_id: int | None,
    name: str,
    span_type: str,
    start_ns: int,
    end_ns: int,
    inputs: Any,
    outputs: Any,
    error: str | None,
    attributes: dict[str, Any],
) -> Any:
    """An ended MLflow span: an OpenTelemetry span whose attributes are JSON values, as MLflow stores them."""
    from mlflow.entities import Span, SpanStatus, SpanStatusCode
    from mlflow.tracing.constant import SpanAttributeKey
    from mlflow.tracing.utils import build_otel_context
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan

    values = {
        SpanAttributeKey.REQUEST_ID: trace_id,
        SpanAttributeKey.SPAN_TYPE: span_type,
        SpanAttributeKey.INPUTS: inputs,
        SpanAttributeKey.OUTPUTS: outputs,
        **attributes,
    }
    status = SpanStatus(SpanStatusCode.ERROR, error) if error else SpanStatus(SpanStatusCode.OK)
    return Span(
        ReadableSpan(
            name=name,
            context=build_otel_context(otel_trace_id, span_id),
            parent=build_otel_context(otel_trace_id, parent_id) if parent_id is not None else None,
            start_time=start_ns,
            end_time=max(end_ns, start_ns),
            attributes={k: json.dumps(v, default=str, ensure_ascii=False) for k, v in values.items()},
            status=status.to_otel_status(),
            resource=Resource.get_empty(),
        )
    )


def _preview(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)[:PREVIEW_CHARS]
