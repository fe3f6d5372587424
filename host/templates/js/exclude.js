// {{name}}: a modelcache exclude policy. Skips documentation: every file
// whose path ends in `.md`, at any depth.
//
// jco maps the WIT to JavaScript: an exported interface is an exported
// object, names are camelCase, u64 is a BigInt, a variant is `{ tag, val }`,
// and a thrown string is the `err` of a `result<_, string>`.

export const exclude = {
  decide(request) {
    return request.files
      .filter((file) => file.path.endsWith(".md"))
      .map((file) => ({ path: file.path, reason: "documentation" }));
  },
};

