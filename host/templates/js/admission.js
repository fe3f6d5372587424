// {{name}}: a modelcache admission policy. Admits mounts from every
// namespace but `kube-system`, without the node's registry credentials and
// under no tenant; refuses `kube-system`.
//
// jco maps the WIT to JavaScript: an exported interface is an exported
// object, names are camelCase, u64 is a BigInt, a variant is `{ tag, val }`,
// an absent option is `undefined`, and a thrown string is the `err` of a
// `result<_, string>`.

export const admission = {
  decide(request) {
    if (request.requester.namespace === "kube-system") {
      return {
        tag: "deny",
        val: `namespace \`kube-system\` may not mount ${request.reference.text}: system pods get no models`,
      };
    }
    return { tag: "admit", val: { nodeCredentials: false, tenant: undefined } };
  },
};

