

class Settings(exports.Settings):
    def validate_settings(self, settings: str) -> None:
        try:
            parsed = json.loads(settings)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise Err("settings must be a JSON object")
