use super::*;

fn project(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (p, t) in files {
        let p = d.path().join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, t).unwrap();
    }
    d
}

fn names(d: &Path, set: &BTreeSet<PathBuf>) -> Vec<String> {
    set.iter()
        .map(|p| p.strip_prefix(d).unwrap().display().to_string())
        .collect()
}

const SITE: &str = r#"
- hosts: all
  vars_files: [vars/common.yml]
  roles:
    - web
    - role: db
  tasks:
    - name: tasks beside the playbook
      ansible.builtin.import_tasks: tasks/extra.yml
    - name: a role by include
      ansible.builtin.include_role:
        name: cache
    - name: a template of the play
      template: src=motd.j2 dest=/etc/motd
"#;

#[test]
fn follows_roles_dependencies_includes_and_vars_files() {
    let d = project(&[
        ("site.yml", SITE),
        ("vars/common.yml", "a: 1\n"),
        ("group_vars/all.yml", "b: 2\n"),
        ("tasks/extra.yml", "- include_tasks: more.yml\n"),
        ("tasks/more.yml", "- debug: msg=hi\n"),
        ("templates/motd.j2", "hello\n"),
        (
            "roles/web/tasks/main.yml",
            "- template: src=\"{{ item }}.j2\" dest=/x\n",
        ),
        ("roles/web/templates/a.j2", "a\n"),
        (
            "roles/web/meta/main.yml",
            "dependencies:\n  - role: common\n",
        ),
        ("roles/common/tasks/main.yml", "- debug: msg=common\n"),
        ("roles/db/tasks/main.yml", "- import_role: name=tls\n"),
        ("roles/tls/defaults/main.yml", "x: 1\n"),
        ("roles/cache/tasks/main.yml", "- debug: msg=cache\n"),
        ("roles/unused/tasks/main.yml", "- debug: msg=never\n"),
        ("build.log", "not read\n"),
        ("notes/readme.txt", "not read\n"),
    ]);
    let r = analyse(&d.path().join("site.yml"), &Skip::default());
    assert!(r.fallback.is_empty(), "{:?}", r.fallback);
    assert_eq!(
        names(d.path(), &r.files),
        [
            "group_vars/all.yml",
            "roles/cache/tasks/main.yml",
            "roles/common/tasks/main.yml",
            "roles/db/tasks/main.yml",
            "roles/tls/defaults/main.yml",
            "roles/web/meta/main.yml",
            "roles/web/tasks/main.yml",
            "roles/web/templates/a.j2",
            "site.yml",
            "tasks/extra.yml",
            "tasks/more.yml",
            "templates/motd.j2",
            "vars/common.yml",
        ]
    );
    assert!(r.absent.contains(&d.path().join("host_vars")));
}

#[test]
fn a_templated_name_falls_back_to_the_whole_directory_and_says_why() {
    for (task, what) in [
        ("- include_tasks: \"{{ os }}.yml\"\n", "include_tasks"),
        ("- include_role:\n    name: \"{{ r }}\"\n", "role name"),
        ("- debug: msg=\"{{ lookup('file', 'x.txt') }}\"\n", "lookup"),
        ("- copy: src=\"{{ f }}\" dest=/x\n", "copy src"),
    ] {
        let d = project(&[(
            "site.yml",
            &format!("- hosts: all\n  tasks:\n{}", indent(task)),
        )]);
        let r = analyse(&d.path().join("site.yml"), &Skip::default());
        assert_eq!(r.fallback.len(), 1, "{task}: {:?}", r.fallback);
        assert!(r.fallback[0].contains(what), "{task}: {:?}", r.fallback);
    }
    // A templated include inside a role is not resolvable either.
    let d = project(&[
        ("site.yml", "- hosts: all\n  roles: [web]\n"),
        (
            "roles/web/tasks/main.yml",
            "- include_tasks: \"{{ os }}.yml\"\n",
        ),
    ]);
    let r = analyse(&d.path().join("site.yml"), &Skip::default());
    assert!(
        r.fallback[0].contains("roles/web/tasks/main.yml"),
        "{:?}",
        r.fallback
    );
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

#[test]
fn playbook_dir_and_role_path_resolve() {
    let d = project(&[
        (
            "site.yml",
            "- hosts: all\n  vars_files: [\"{{ playbook_dir }}/v.yml\"]\n  roles: [web]\n",
        ),
        ("v.yml", "a: 1\n"),
        (
            "roles/web/tasks/main.yml",
            "- include_tasks: \"{{ role_path }}/tasks/x.yml\"\n",
        ),
        ("roles/web/tasks/x.yml", "- debug: msg=x\n"),
    ]);
    let r = analyse(&d.path().join("site.yml"), &Skip::default());
    assert!(r.fallback.is_empty(), "{:?}", r.fallback);
    assert!(r.files.contains(&d.path().join("v.yml")));
}

#[test]
fn a_missing_role_or_unparsable_playbook_falls_back() {
    let d = project(&[("site.yml", "- hosts: all\n  roles: [nowhere]\n")]);
    let r = analyse(&d.path().join("site.yml"), &Skip::default());
    assert!(r.fallback[0].contains("nowhere"), "{:?}", r.fallback);
    let d = project(&[("site.yml", "- hosts: [all\n")]);
    let r = analyse(&d.path().join("site.yml"), &Skip::default());
    assert!(r.fallback[0].contains("cannot parse"), "{:?}", r.fallback);
    // Ansible's YAML tags parse.
    let d = project(&[(
        "site.yml",
        "- hosts: all\n  vars:\n    s: !unsafe '{{ raw }}'\n  tasks: []\n",
    )]);
    let r = analyse(&d.path().join("site.yml"), &Skip::default());
    assert!(r.fallback.is_empty(), "{:?}", r.fallback);
}

#[test]
fn layouts_and_vcs_are_never_read() {
    let d = project(&[
        ("site.yml", "- hosts: all\n  roles: [web]\n"),
        ("roles/web/tasks/main.yml", "- debug: msg=x\n"),
        ("roles/web/oci/oci-layout", "{}\n"),
        ("roles/web/oci/blobs/sha256/ab", "x\n"),
        ("roles/web/.git/HEAD", "ref\n"),
        ("out/blob", "x\n"),
    ]);
    let skip = Skip::new(&[&d.path().join("out")]);
    let mut all = BTreeSet::new();
    skip.walk(d.path(), &mut all);
    assert_eq!(
        names(d.path(), &all),
        ["roles/web/tasks/main.yml", "site.yml"]
    );
}
