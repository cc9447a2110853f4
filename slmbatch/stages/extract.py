"""``extract``: a JSON object that follows a schema, as a typed struct column."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY
from typing import Any

import pyarrow as pa

from ..errors import ConfigError, RowError
from ..scoring import as_record, exact_match, field_prf
from ..spec import check_positive_int, freeze, set_field, spec
from .base import Answer, ReplicaProtocol, Request, Stage, sampled_logprobs


@spec
class Extract(Stage):
    """Extract a JSON object matching ``schema`` from each row.

    Decoding is constrained to the schema (vLLM structured outputs, xgrammar),
    then the text is parsed and validated against the schema again; a row whose
    output is cut off at ``max_output_tokens`` or does not validate gets an
    error instead of a value. The answer column is a struct whose fields are
    typed from the schema (string, integer -> int64, number -> float64,
    boolean, arrays, nested objects).

    Confidence is the **minimum** probability among the generated tokens. Under
    the grammar, tokens the schema forces (braces, keys) have probability 1, so
    the minimum is taken over the model's real choices: an extraction is wrong
    if any one field is wrong, and the minimum - unlike the mean or the
    product - neither dilutes one doubtful value among many confident tokens
    nor penalises long answers for their length.

    Args:
        schema: a pydantic model class or a JSON-schema dict (an object with
            ``properties``). Stored as its JSON schema.
        max_output_tokens: generation budget for the JSON answer, kept free in
            the model's context: if the prompt (with the schema) and it leave no
            room for input, the job fails when a replica starts.
    """

    kind = "extract"
    headline_metric = "exact_match"
    default_system = "You extract structured data. Reply with a single JSON object and nothing else."
    default_prompt = "Extract these fields as JSON following this schema:\n{schema}\n\nText: {input}"
    template_extras = ("schema",)
    output_budget_field = "max_output_tokens"

    _: KW_ONLY
    schema: Any
    max_output_tokens: int = 256

    def __post_init__(self):
        super().__post_init__()
        schema = self.schema
        if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
            schema = schema.model_json_schema()
        if not isinstance(schema, Mapping):
            raise ConfigError("Extract.schema", f"must be a pydantic model class or a JSON-schema dict, got {schema!r}")
        try:
            schema = json.loads(json.dumps(schema))  # plain, picklable, and proves it is JSON
        except (TypeError, ValueError) as exc:
            raise ConfigError("Extract.schema", f"must be plain JSON (dicts, lists, strings, numbers): {exc}") from None
        if "$ref" in schema and "type" not in schema:  # a pydantic model that refers to itself: its definition
            defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
            schema = {**_resolve(schema, schema), **defs}
        if (
            schema.get("type") != "object"
            or not isinstance(schema.get("properties"), Mapping)
            or not schema["properties"]
        ):
            raise ConfigError("Extract.schema", "must describe an object with at least one property")
        try:
            import jsonschema

            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ConfigError("Extract.schema", f"is not a valid JSON schema: {exc.message}") from None
        try:
            arrow_type(schema, schema, "Extract.schema")  # rejects what cannot become a column
        except RecursionError:
            raise ConfigError(
                "Extract.schema", "is recursive (an object that contains itself): a column needs a fixed depth"
            ) from None
        set_field(self, "schema", freeze(schema))
        check_positive_int(self.max_output_tokens, "Extract.max_output_tokens")

    def plain_schema(self) -> dict:
        return json.loads(json.dumps(self.schema))

    def describe_options(self) -> list[str]:
        return [f"fields=[{', '.join(self.schema['properties'])}]", f"max_output_tokens={self.max_output_tokens}"]

    def answer_type(self) -> pa.DataType:
        schema = self.plain_schema()
        return arrow_type(schema, schema, "Extract.schema")

    def template_values(self, row, text):
        return {**row, "input": text, "schema": json.dumps(self.plain_schema())}

    def reserved_output_tokens(self, runner: str = "generate") -> int:
        return self.max_output_tokens

    def frontier_request(self, row) -> dict:
        request = super().frontier_request(row)
        request["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": self.name, "schema": self.plain_schema(), "strict": True},
        }
        return request

    def parse_frontier(self, text: str) -> dict:
        return parse_and_validate(text, self.plain_schema())

    def infer(self, requests: list[Request], replica: ReplicaProtocol) -> list[Answer]:
        if not requests:
            return []
        schema = self.plain_schema()
        outputs = replica.generate(
            [r.prompt_ids for r in requests], max_tokens=self.max_output_tokens, logprobs=0, json_schema=schema
        )
        answers = []
        for request, out in zip(requests, outputs):
            completion = out.outputs[0]
            tokens_in, tokens_out = len(request.prompt_ids), len(completion.token_ids)
            try:
                if completion.finish_reason == "length":
                    raise RowError(
                        f"output hit max_output_tokens={self.max_output_tokens} before the JSON object closed"
                    )
                value = parse_and_validate(completion.text, schema)
            except RowError as exc:
                answers.append(Answer(error=str(exc), tokens_in=tokens_in, tokens_out=tokens_out))
                continue
            logprobs = sampled_logprobs(completion)
            confidence = min((math.exp(lp) for lp in logprobs), default=0.0)
            answers.append(Answer(value, confidence, tokens_in, tokens_out))
        return answers

    @classmethod
    def score(cls, prediction: Any, gold: Any) -> float:
        return float(exact_match(as_record(prediction), as_record(gold)))

    @classmethod
    def metrics(cls, predictions: Sequence[Any], golds: Sequence[Any]) -> dict[str, float]:
        if not golds:
            return super().metrics(predictions, golds)
        preds = [as_record(p) for p in predictions]
        gold = [as_record(g) for g in golds]
        return {
            "exact_match": sum(exact_match(p, g) for p, g in zip(preds, gold)) / len(gold),
            **field_prf(preds, gold),
        }


def parse_and_validate(text: str, schema: dict) -> dict:
    """Parse a model's JSON answer and validate it; RowError says what is wrong."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RowError(f"output is not valid JSON ({exc.msg} at char {exc.pos})") from None
    errors = sorted(jsonschema.validators.validator_for(schema)(schema).iter_errors(value), key=lambda e: list(e.path))
    if errors:
        where = "/".join(str(p) for p in errors[0].path) or "(root)"
        raise RowError(f"output does not match the schema at {where}: {errors[0].message}")
    return conform(value, schema, schema)


def _resolve(node: Mapping, root: Mapping) -> Mapping:
    ref = node.get("$ref")
    if not ref:
        return node
    if not ref.startswith("#/"):
        raise ConfigError("Extract.schema", f"only local $ref are supported, got {ref!r}")
    target: Any = root
    for part in ref[2:].split("/"):
        if not isinstance(target, Mapping) or part not in target:
            raise ConfigError("Extract.schema", f"$ref {ref!r} names no definition in the schema")
        target = target[part]
    if not isinstance(target, Mapping):
        raise ConfigError("Extract.schema", f"$ref {ref!r} names {target!r}, not a schema")
    return _resolve(target, root)


def _non_null(node: Mapping, root: Mapping) -> Mapping:
    """Collapse ``anyOf: [X, null]`` / ``type: [X, "null"]`` (pydantic's Optional) to X."""
    node = _resolve(node, root)
    for key in ("anyOf", "oneOf"):
        if key in node:
            options = [o for o in node[key] if _resolve(o, root).get("type") != "null"]
            if len(options) == 1:
                return _non_null(options[0], root)
    if isinstance(node.get("type"), list):
        types = [t for t in node["type"] if t != "null"]
        if len(types) == 1:
            return {**node, "type": types[0]}
    return node


_SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


def arrow_type(node: Mapping, root: Mapping, field: str) -> pa.DataType:
    """Arrow type of a JSON-schema node; ConfigError naming ``field`` if it has none."""
    node = _non_null(node, root)
    kind = node.get("type")
    if isinstance(kind, list):
        raise ConfigError(field, f"may be any of {kind}: a column holds one type (or one type and null)")
    if kind is None and "enum" in node and all(isinstance(v, str) for v in node["enum"]):
        return pa.string()
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array" and isinstance(node.get("items"), Mapping):
        return pa.list_(arrow_type(node["items"], root, f"{field}[]"))
    if kind == "object" and isinstance(node.get("properties"), Mapping) and node["properties"]:
        return pa.struct(
            [pa.field(name, arrow_type(sub, root, f"{field}.{name}")) for name, sub in node["properties"].items()]
        )
    raise ConfigError(field, f"cannot be stored as a typed column (schema {dict(node)!r}); give it a type")


def conform(value: Any, node: Mapping, root: Mapping) -> Any:
    """Shape a validated value to its Arrow type (drop unknown keys, fill missing with None)."""
    node = _non_null(node, root)
    if value is None:
        return None
    kind = node.get("type")
    if kind == "object":
        return {name: conform(value.get(name), sub, root) for name, sub in node["properties"].items()}
    if kind == "array":
        return [conform(v, node["items"], root) for v in value]
    if kind == "number":
        return float(value)
    return value
