
impl settings::Guest for Policy {
    fn validate_settings(settings: String) -> Result<(), String> {
        match serde_json::from_str::<serde_json::Value>(&settings) {
            Ok(serde_json::Value::Object(_)) => Ok(()),
            _ => Err("settings must be a JSON object".to_owned()),
        }
    }
}

export!(Policy);
