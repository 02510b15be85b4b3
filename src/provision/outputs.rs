//! How a play reports outputs to wpimg: `ansible.builtin.set_stats` in the play, read by a tiny
//! callback plugin wpimg writes into each run's private directory. At the end of the play the
//! callback writes the custom stats — every host's merged, then the run-wide ones
//! (`per_host: false`, which win) — as one JSON object to the file named by
//! [`OUTPUTS_FILE_ENV`]; [`read`] turns it into [`Outputs`].
//!
//! The plugin does not need enabling (`CALLBACK_NEEDS_ENABLED = False`): being in
//! `ANSIBLE_CALLBACK_PLUGINS` loads it, so wpimg never sets `ANSIBLE_CALLBACKS_ENABLED` (which
//! would hide an ansible.cfg's `callbacks_enabled`); when the environment sets it, wpimg appends
//! its callback. Callbacks are independent of the strategy, so Mitogen's runs report the same.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::outputs::{self, Outputs, OutputsError};

/// The callback's name (`CALLBACK_NAME`, and its file's stem).
pub const CALLBACK_NAME: &str = "wpimg_outputs";
/// The environment variable naming the file the callback writes.
pub const OUTPUTS_FILE_ENV: &str = "WPIMG_OUTPUTS_FILE";
/// Ansible's default callback plugin directories (kept behind wpimg's).
const DEFAULT_CALLBACK_PLUGINS: &str =
    "~/.ansible/plugins/callback:/usr/share/ansible/plugins/callback";

const PLUGIN: &str = r#"# Written by wpimg for one ansible-playbook run: reports the play's set_stats values.
import json
import os

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "wpimg_outputs"
    CALLBACK_NEEDS_ENABLED = False
    CALLBACK_NEEDS_WHITELIST = False

    def v2_playbook_on_stats(self, stats):
        custom = getattr(stats, "custom", None) or {}
        merged = {}
        for host in sorted(h for h in custom if h != "_run"):
            merged.update(custom[host] or {})
        merged.update(custom.get("_run") or {})
        path = os.environ.get("WPIMG_OUTPUTS_FILE")
        if not path:
            return
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(merged, f, default=str)
        os.replace(tmp, path)
"#;

/// The callback's files in a run's private directory.
#[derive(Debug, Clone)]
pub struct OutputsCallback {
    /// The directory holding the plugin (for `ANSIBLE_CALLBACK_PLUGINS`).
    pub plugins: PathBuf,
    /// The file the callback writes.
    pub file: PathBuf,
}

impl OutputsCallback {
    /// Write the plugin into `run_dir`.
    pub fn write(run_dir: &Path) -> std::io::Result<Self> {
        let plugins = run_dir.join("callback_plugins");
        fs_err::create_dir_all(&plugins)?;
        fs_err::write(plugins.join(format!("{CALLBACK_NAME}.py")), PLUGIN)?;
        Ok(Self {
            plugins,
            file: run_dir.join("outputs.json"),
        })
    }

    /// The environment that loads the callback, given the run's environment so far (`set`,
    /// image.yaml's over the defaults) and the inherited one: wpimg's plugin directory first,
    /// then the ones already set (else Ansible's defaults); `ANSIBLE_CALLBACKS_ENABLED` extended
    /// only when it is set.
    pub fn environment(
        &self,
        set: &BTreeMap<String, String>,
        inherited: &dyn Fn(&str) -> Option<String>,
    ) -> BTreeMap<String, String> {
        let given = |k: &str| {
            set.get(k)
                .cloned()
                .or_else(|| inherited(k))
                .filter(|v| !v.trim().is_empty())
        };
        let mut env = BTreeMap::new();
        let others = given("ANSIBLE_CALLBACK_PLUGINS")
            .unwrap_or_else(|| DEFAULT_CALLBACK_PLUGINS.to_string());
        env.insert(
            "ANSIBLE_CALLBACK_PLUGINS".to_string(),
            format!("{}:{others}", self.plugins.display()),
        );
        if let Some(enabled) = given("ANSIBLE_CALLBACKS_ENABLED") {
            let listed = enabled.split(',').any(|c| c.trim() == CALLBACK_NAME);
            let value = match listed {
                true => enabled,
                false => format!("{enabled},{CALLBACK_NAME}"),
            };
            env.insert("ANSIBLE_CALLBACKS_ENABLED".to_string(), value);
        }
        env.insert(
            OUTPUTS_FILE_ENV.to_string(),
            self.file.display().to_string(),
        );
        env
    }

    /// The outputs the play reported (none when it reported nothing).
    pub fn read(&self) -> Result<Outputs, OutputsError> {
        match fs_err::read(&self.file) {
            Ok(raw) => outputs::from_json(&self.file, &raw),
            Err(_) => Ok(Outputs::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callback_goes_first_and_keeps_what_was_set() {
        let d = tempfile::tempdir().unwrap();
        let cb = OutputsCallback::write(d.path()).unwrap();
        assert!(cb.plugins.join("wpimg_outputs.py").is_file());
        let none = |_: &str| None;
        let env = cb.environment(&BTreeMap::new(), &none);
        let plugins = format!("{}:{DEFAULT_CALLBACK_PLUGINS}", cb.plugins.display());
        assert_eq!(env["ANSIBLE_CALLBACK_PLUGINS"], plugins);
        assert!(!env.contains_key("ANSIBLE_CALLBACKS_ENABLED"));
        assert_eq!(env[OUTPUTS_FILE_ENV], cb.file.display().to_string());
        let set = BTreeMap::from([(
            "ANSIBLE_CALLBACKS_ENABLED".to_string(),
            "profile_tasks".to_string(),
        )]);
        let inherited = |k: &str| (k == "ANSIBLE_CALLBACK_PLUGINS").then(|| "/mine".to_string());
        let env = cb.environment(&set, &inherited);
        assert_eq!(
            env["ANSIBLE_CALLBACKS_ENABLED"],
            "profile_tasks,wpimg_outputs"
        );
        assert_eq!(
            env["ANSIBLE_CALLBACK_PLUGINS"],
            format!("{}:/mine", cb.plugins.display())
        );
        assert_eq!(cb.read().unwrap(), Outputs::new());
        std::fs::write(&cb.file, r#"{"v": "1"}"#).unwrap();
        assert_eq!(cb.read().unwrap()["v"], "1");
    }
}
