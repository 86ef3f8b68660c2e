"""The edit recipe: the YAML a user writes to build an edited model.

Example::

    base: hf://openai-community/gpt2        # the base model's source (as ingested)
    family: gpt2-detox                      # catalogue family holding the task vectors
    decomposition: run-2026-11-24           # needed by methods that read shared/unique parts
    method: unique_negation                 # a name from tasks.edit.available_methods()
    members:
      - name: toxic
        weight: 1.0                         # plus the method's per-member fields, if any
    params:
      scale: 1.0                            # the method's parameters
    output: ./out/gpt2-detox                # optional; the flow may override it
    lora_targets: ["*.attn.*"]              # optional: narrows a --lora-rank export
    fan_in_fan_out: true                    # optional: Conv1D layout, for a base without
                                            # a transformers config (tasks.lora_targets)

Guarantees: ``load_recipe`` and ``Recipe.model_validate`` check the whole recipe, including
the method's parameters and per-member fields against the method's registered pydantic
models, and every error names its field (``members[1].weight``, ``params.density``,
``method``). Member names are checked against a family by ``check_members``, which needs
the family's list of members.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from tvsplit.storage.errors import (
    PROBLEM_SEPARATOR,
    format_validation_error,
    validation_problems,
)
from tvsplit.storage.names import check_node_name
from tvsplit.tasks.edit import EditError, EditMethod, MemberParams, get_method

__all__ = ["Recipe", "RecipeError", "RecipeMember", "check_members", "load_recipe", "parse_recipe"]


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and every faulty field."""


class RecipeMember(BaseModel):
    """One edit member: its name in the family, its weight, and the method's member fields."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(..., min_length=1, description="The member's name in the family.")
    weight: float = Field(1.0, allow_inf_nan=False, description="The member's coefficient.")

    def method_fields(self) -> dict[str, Any]:
        """``weight`` and the extra (method-specific) fields, without ``name``."""
        return {"weight": self.weight, **(self.model_extra or {})}


class Recipe(BaseModel):
    """A validated edit recipe; ``method_params`` and ``member_params`` are typed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = Field(..., min_length=1, description="Source of the base model.")
    family: str = Field(..., min_length=1, description="Catalogue family of the members.")
    decomposition: str | None = Field(
        None, min_length=1, description="Decomposition run (for methods that need the split)."
    )
    method: str = Field(..., description="Edit method, by registry name.")
    members: list[RecipeMember] = Field(..., min_length=1)
    params: dict[str, Any] = Field(default_factory=dict, description="The method's parameters.")
    output: str | None = Field(None, min_length=1, description="Output model folder.")
    excluded_from: str = Field(
        "base",
        min_length=1,
        description="Where parameters outside the family (per-member heads) come from: "
        "'base', or the name of a member whose own weights supply them.",
    )

    lora_targets: list[str] | None = Field(
        None,
        min_length=1,
        description="Shell patterns over module names that a LoRA export (--lora-rank) "
        "keeps; default: every module PEFT can adapt.",
    )
    fan_in_fan_out: bool | None = Field(
        None,
        description="For a base without a transformers config: its 2-D weights are stored "
        "in × out (transformers' Conv1D). With a config the model's structure decides.",
    )

    _method_params: BaseModel = PrivateAttr()
    _member_params: list[MemberParams] = PrivateAttr()

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        try:
            get_method(value)
        except EditError as error:
            raise ValueError(str(error)) from None
        return value

    @field_validator("family", "decomposition", "excluded_from")
    @classmethod
    def _node_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or (info.field_name == "excluded_from" and value == "base"):
            return value
        kind = {"family": "family", "decomposition": "run"}.get(info.field_name, "member")
        try:
            return check_node_name(kind, value)
        except ValueError as error:
            raise ValueError(str(error)) from None

    @field_validator("members")
    @classmethod
    def _distinct_members(cls, members: list[RecipeMember]) -> list[RecipeMember]:
        seen: set[str] = set()
        for i, member in enumerate(members):
            try:
                check_node_name("member", member.name)
            except ValueError as error:
                raise ValueError(f"members[{i}].name: {error}") from None
            if member.name in seen:
                raise ValueError(f"member {member.name!r} is listed twice (members[{i}])")
            seen.add(member.name)
        return members

    @model_validator(mode="after")
    def _method_fields(self) -> Recipe:
        edit = get_method(self.method)
        problems: list[str] = []
        if edit.needs_split and self.decomposition is None:
            problems.append(
                f"decomposition: method {self.method!r} reads shared/unique parts, "
                "so the recipe must name a decomposition run"
            )
        try:
            self._method_params = edit.parse_params(self.params)
        except ValidationError as error:
            problems += validation_problems(error, ("params",))
        parsed: list[MemberParams] = []
        for i, member in enumerate(self.members):
            try:
                parsed.append(edit.parse_members([member.method_fields()], 1)[0])
            except ValidationError as error:
                problems += validation_problems(error, ("members", i))
        self._member_params = parsed
        if problems:
            raise ValueError(PROBLEM_SEPARATOR.join(problems))
        return self

    @property
    def edit_method(self) -> EditMethod:
        return get_method(self.method)

    @property
    def method_params(self) -> BaseModel:
        """The method's parameters, validated by its registered params model."""
        return self._method_params

    @property
    def member_params(self) -> list[MemberParams]:
        """Per-member parameters in member order, validated by the method's member model."""
        return list(self._member_params)

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]


def parse_recipe(data: Any, *, source: str = "recipe") -> Recipe:
    """Validate a recipe from parsed YAML/JSON data; RecipeError lists every faulty field."""
    if data is None:
        raise RecipeError(
            f"{source}: the recipe is empty; it needs base, family, method and members"
        )
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: a recipe is a mapping (base, family, method, members, ...), "
            f"not {type(data).__name__}"
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(
            format_validation_error(error, source=f"{source}: invalid recipe", bullets=True)
        ) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML file; RecipeError names the file and each bad field
    (YAML syntax errors with their line and column)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise RecipeError(f"{path}: cannot read the recipe ({error.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(
            f"{path}: not a text (UTF-8) file, byte {error.start} is 0x{raw[error.start]:02x}; "
            "a recipe is YAML"
        ) from None
    if "\x00" in text:
        raise RecipeError(f"{path}: not a text file (it holds NUL bytes); a recipe is YAML")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise RecipeError(f"{path}: not valid YAML{where}: {problem}") from None
    return parse_recipe(data, source=str(path))


def check_members(recipe: Recipe, available: Iterable[str]) -> None:
    """Raise RecipeError unless every recipe member is one of ``available`` (the family's
    members); the message names ``members[i].name`` and suggests close names."""
    known = list(available)
    known_set = set(known)
    problems = []
    for i, name in enumerate(recipe.member_names):
        if name in known_set:
            continue
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        problems.append(
            f"  - members[{i}].name: {name!r} is not a member of family {recipe.family!r}{hint}"
        )
    if problems:
        listed = ", ".join(map(repr, sorted(known))) or "none"
        raise RecipeError(
            "recipe members missing from the family\n"
            + "\n".join(problems)
            + f"\n  family {recipe.family!r} has: {listed}"
        )
