// {{name}}: a modelcache quota policy. Admits a pull only while it takes at
// most half of the bytes still free (after the pulls already admitted).
//
// jco maps the WIT to JavaScript: an exported interface is an exported
// object, names are camelCase, u64 is a BigInt, a variant is `{ tag, val }`,
// and a thrown string is the `err` of a `result<_, string>`.

export const quota = {
  decide(request) {
    const reserved = request.reservedBytes;
    const free = request.filesystem.freeBytes > reserved ? request.filesystem.freeBytes - reserved : 0n;
    if (request.incomingBytes <= free / 2n) {
      return { tag: "admit" };
    }
    return {
      tag: "deny",
      val: `${request.reference} would take ${request.incomingBytes} of the ${free} bytes free; this node admits at most half`,
    };
  },
};

