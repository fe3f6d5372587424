export const settings = {
  validateSettings(text) {
    let parsed;
    try {
      parsed = JSON.parse(text);
    } catch {
      parsed = null;
    }
    if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
      throw "settings must be a JSON object";
    }
  },
};
