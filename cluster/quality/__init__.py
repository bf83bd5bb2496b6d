"""Clinical output quality: note templates and schemas (`notes`), versioned prompt
templates (`prompts`), the note scorer (`scoring`) and the evaluation harness (`evaluation`)."""
