// Example quota policy in JavaScript: deny any single pull that would add
// more than `max-bytes` to the cache. The same policy as ../src/lib.rs (Rust)
// and ../python/app.py, passing the same cases in ../cases/.
//
// Build: `npm install && npm run build` (jco componentize with `--disable all`,
// which keeps out the WASI imports the host refuses).
//
// jco maps the WIT to JavaScript: an export interface is an exported object,
// names are camelCase, u64 is a BigInt, a variant is `{ tag, val }`, and
// throwing a string from a function returning `result<_, string>` is its `err`.

function maxBytes(settings) {
  let parsed;
  try {
    parsed = JSON.parse(settings);
  } catch (error) {
    throw `settings are not JSON: ${error.message}`;
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    throw "settings must be a JSON object";
  }
  for (const key of Object.keys(parsed)) {
    if (key !== "max-bytes") {
      throw `unknown setting \`${key}\` (the only one is \`max-bytes\`)`;
    }
  }
  if (!("max-bytes" in parsed)) {
    throw "`max-bytes` is required: the most bytes one pull may add";
  }
  const value = parsed["max-bytes"];
  if (!Number.isSafeInteger(value) || value < 0) {
    throw `\`max-bytes\` must be a whole number of bytes, not ${JSON.stringify(value)}`;
  }
  return BigInt(value);
}

export const settings = {
  validateSettings(text) {
    maxBytes(text);
  },
};

export const quota = {
  decide(request) {
    const limit = maxBytes(request.settings);
    if (request.incomingBytes <= limit) {
      return { tag: "admit" };
    }
    return {
      tag: "deny",
      val: `${request.reference} would add ${request.incomingBytes} bytes; this node allows at most ${limit} bytes per pull`,
    };
  },
};
