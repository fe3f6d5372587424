"""Example quota policy in Python: deny any single pull that would add more
than `max-bytes` to the cache. The same policy as ../src/lib.rs (Rust) and
../js/policy.js, passing the same cases in ../cases/.

Build (componentize-py from PyPI; `--stub-wasi` keeps out the filesystem and
socket imports the host refuses):

    componentize-py -d ../../../wit -w quota-policy componentize app -o max-pull.wasm --stub-wasi
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.quota import Request, Verdict, Verdict_Admit, Verdict_Deny


def max_bytes(settings: str) -> int:
    try:
        parsed = json.loads(settings)
    except ValueError as error:
        raise Err(f"settings are not JSON: {error}")
    if not isinstance(parsed, dict):
        raise Err("settings must be a JSON object")
    for key in parsed:
        if key != "max-bytes":
            raise Err(f"unknown setting `{key}` (the only one is `max-bytes`)")
    if "max-bytes" not in parsed:
        raise Err("`max-bytes` is required: the most bytes one pull may add")
    value = parsed["max-bytes"]
    # bool is an int in Python; JSON true is not a size.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64:
        raise Err(f"`max-bytes` must be a whole number of bytes, not {json.dumps(value)}")
    return value


class Settings(exports.Settings):
    def validate_settings(self, settings: str) -> None:
        max_bytes(settings)


class Quota(exports.Quota):
    def decide(self, request: Request) -> Verdict:
        limit = max_bytes(request.settings)
        if request.incoming_bytes <= limit:
            return Verdict_Admit()
        return Verdict_Deny(
            f"{request.reference} would add {request.incoming_bytes} bytes; "
            f"this node allows at most {limit} bytes per pull"
        )
