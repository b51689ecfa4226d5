"""Render docs/proto-reference.md from the comments in protos/.

The comments on every service, message, field and enum are the reference;
this turns them into one Markdown page so the page can never drift from the
contract (gen_protos.py writes it and checks it along with the stubs).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

# Field numbers of FileDescriptorProto and friends, as SourceCodeInfo paths use them.
_PACKAGE, _MESSAGE, _FIELD, _ENUM, _VALUE, _SERVICE, _METHOD = 2, 4, 2, 5, 2, 6, 2
_TYPES = {
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES: "bytes",
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "string",
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "bool",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32: "int32",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT64: "uint64",
}


def render(protos: Path, sources: list[str]) -> str:
    """The reference page for the given .proto files under protos/."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"--proto_path={protos}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *sources,
            ],
            check=True,
            cwd=protos,
        )
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    lines = [
        "# safehold.v1 reference",
        "",
        "Generated from the comments in `protos/` by `python scripts/gen_protos.py`; "
        "edit the .proto files, not this page.",
        "",
    ]
    for file in files:
        comments = {tuple(loc.path): _text(loc) for loc in file.source_code_info.location}
        lines += [f"## {file.name}", "", comments.get((_PACKAGE,), ""), ""]
        for s, service in enumerate(file.service):
            lines += [f"### service {service.name}", "", comments.get((_SERVICE, s), ""), ""]
            for m, method in enumerate(service.method):
                arrow = "stream " if method.server_streaming else ""
                inbound = "stream " if method.client_streaming else ""
                lines += [
                    f"- `{method.name}({inbound}{_short(method.input_type)}) returns "
                    f"({arrow}{_short(method.output_type)})`: "
                    f"{comments.get((_SERVICE, s, _METHOD, m), '')}"
                ]
            lines.append("")
        for e, enum in enumerate(file.enum_type):
            lines += [
                f"### enum {enum.name}",
                "",
                comments.get((_ENUM, e), ""),
                "",
                "| value | number | meaning |",
                "|---|---|---|",
            ]
            lines += [
                f"| `{v.name}` | {v.number} | {comments.get((_ENUM, e, _VALUE, i), '')} |"
                for i, v in enumerate(enum.value)
            ]
            lines.append("")
        for i, message in enumerate(file.message_type):
            lines += [f"### message {message.name}", "", comments.get((_MESSAGE, i), ""), ""]
            if message.field:
                lines += ["| field | type | meaning |", "|---|---|---|"]
                maps = {n.name: n for n in message.nested_type if n.options.map_entry}
                for f, field in enumerate(message.field):
                    kind = _TYPES.get(field.type) or _short(field.type_name)
                    if kind in maps:
                        key, value = (
                            _TYPES.get(x.type) or _short(x.type_name) for x in maps[kind].field
                        )
                        kind = f"map<{key}, {value}>"
                    elif field.label == field.LABEL_REPEATED:
                        kind = f"repeated {kind}"
                    if field.HasField("oneof_index") and not field.proto3_optional:
                        kind += f" (oneof {message.oneof_decl[field.oneof_index].name})"
                    elif field.proto3_optional:
                        kind = f"optional {kind}"
                    meaning = comments.get((_MESSAGE, i, _FIELD, f), "")
                    lines.append(f"| `{field.name}` | {kind} | {meaning} |")
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _text(location: descriptor_pb2.SourceCodeInfo.Location) -> str:
    return " ".join(location.leading_comments.split())


def _short(type_name: str) -> str:
    return type_name.rsplit(".", 1)[-1] or type_name
