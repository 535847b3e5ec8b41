"""Training the embedded tiny MoE (server/assets/tiny) on text every machine has."""
