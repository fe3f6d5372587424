// {{name}}: a modelcache gc policy. Evicts every entry unused for more than
// a week, longest idle first.
//
// jco maps the WIT to JavaScript: an exported interface is an exported
// object, names are camelCase, u64 is a BigInt, a variant is `{ tag, val }`,
// and a thrown string is the `err` of a `result<_, string>`.

const WEEK = 7n * 24n * 60n * 60n;

export const gc = {
  decide(request) {
    return request.candidates
      .filter((candidate) => request.now - candidate.lastUsedAt > WEEK)
      .sort((a, b) => (a.lastUsedAt < b.lastUsedAt ? -1 : a.lastUsedAt > b.lastUsedAt ? 1 : 0))
      .map((candidate) => candidate.key);
  },
};

