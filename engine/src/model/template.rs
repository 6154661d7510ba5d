//! The model's own chat template, rendered in a sandboxed template engine.
//!
//! The template comes only from the model file (a request can never supply one). minijinja
//! has no file system, network or process access; the environment below has no loader, a fuel
//! limit (bounds the work any template can do) and minijinja's built-in recursion limit.

use anyhow::{Context, Result};
use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;

/// Fuel for one render: each template instruction costs one unit. The SmolLM2 template uses a
/// few hundred per message; this bounds a pathological template to milliseconds.
const TEMPLATE_FUEL: u64 = 2_000_000;

/// One chat message as the template sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        // Python-style string methods (`.strip()`, `.startswith()`) that HF templates use.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat".to_owned(), source.to_owned())
            .context("the model's chat template does not parse")?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .context("chat template missing")?;
        tmpl.render(context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| anyhow::anyhow!("rendering the chat template: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::new(CHATML, "<s>".into(), "</s>".into()).unwrap();
        let out = t
            .render(
                &[ChatMessage {
                    role: "user".into(),
                    content: " hi ".into(),
                }],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn runaway_template_runs_out_of_fuel() {
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            String::new(),
            String::new(),
        )
        .unwrap();
        let err = t.render(&[], true).unwrap_err();
        assert!(format!("{err:#}").contains("fuel"), "{err:#}");
    }

    #[test]
    fn template_cannot_include_files() {
        let t =
            ChatTemplate::new("{% include '/etc/passwd' %}", String::new(), String::new()).unwrap();
        assert!(t.render(&[], true).is_err());
    }
}
