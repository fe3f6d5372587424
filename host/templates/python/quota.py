"""{{name}}: a modelcache quota policy. Admits a pull only while it takes at
most half of the bytes still free (after the pulls already admitted)."""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.quota import Request, Verdict, Verdict_Admit, Verdict_Deny


class Quota(exports.Quota):
    def decide(self, request: Request) -> Verdict:
        free = max(request.filesystem.free_bytes - request.reserved_bytes, 0)
        if request.incoming_bytes <= free // 2:
            return Verdict_Admit()
        return Verdict_Deny(
            f"{request.reference} would take {request.incoming_bytes} of the {free} bytes free; "
            "this node admits at most half"
        )
