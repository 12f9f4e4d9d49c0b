//! The committed PTX as modules of one entry point each, so that a handle can have the driver
//! compile only the kernels a program launches, not all of them when it is made (the sm_90 PTX
//! holds 169 entry points in 18 MB; the driver compiles a module at a time: the quickstart took
//! 49.4 s with the PTX as one module and 1.5 s with a module a kernel, H200, cache off, session
//! 26). `XENT_LAZY_MODULES=0` loads the PTX as one module instead.
//!
//! Only `std`: `cargo xtask check` includes this file (`#[path]`) to compile every module it
//! makes with `ptxas`.

use std::collections::HashMap;
use std::ops::Range;

/// A PTX file split into its top level: the lines outside any function (`.version`, `.target`,
/// `.address_size`, declarations such as the dynamic shared memory's), the device functions
/// (`.func`) and the kernels (`.entry`), each with the functions it calls.
pub struct PtxIndex {
    text: String,
    header: String,
    funcs: Vec<Item>,
    entries: HashMap<String, Item>,
}

/// A function or kernel: its name, its text (from the `.func` / `.entry` line to the closing
/// brace), and the functions it calls directly (indices into [`PtxIndex::funcs`]).
struct Item {
    #[cfg_attr(not(test), allow(dead_code))] // read by `funcs_in_module` (tests)
    name: String,
    range: Range<usize>,
    calls: Vec<usize>,
}

impl PtxIndex {
    /// Splits `ptx`. Lines outside functions go to the header in their order (a function's
    /// declaration without a body, ending in `;`, is one of them); a function runs from its
    /// `.func` or `.entry` line to the first line that is a lone `}` after its body's `{`.
    pub fn parse(text: String) -> PtxIndex {
        let ptx = text.as_str();
        let mut header = String::new();
        let mut items: Vec<(bool, String, Range<usize>)> = Vec::new();
        // (start of the item, its name, whether an entry, whether its body has begun)
        let mut open: Option<(usize, String, bool, bool)> = None;
        let mut at = 0;
        for line in ptx.split_inclusive('\n') {
            let start = at;
            at += line.len();
            let bare = line.trim_end();
            if let Some((item_start, name, entry, body)) = open.as_mut() {
                if bare == "{" {
                    *body = true;
                } else if *body && bare == "}" {
                    items.push((*entry, std::mem::take(name), *item_start..at));
                    open = None;
                } else if !*body && bare.ends_with(';') {
                    // A declaration: it stays at the top of every module.
                    header.push_str(&ptx[*item_start..at]);
                    open = None;
                }
                continue;
            }
            if let Some((entry, name)) = function_name(bare) {
                open = Some((start, name, entry, false));
            } else {
                header.push_str(line);
            }
        }
        let func_names: Vec<String> = items
            .iter()
            .filter(|(entry, _, _)| !entry)
            .map(|(_, name, _)| name.clone())
            .collect();
        // The functions an item calls: the names on its `call` lines (a scan of those lines only:
        // the PTX is tens of megabytes and a handle parses it when it is made).
        let calls_in = |range: &Range<usize>, own: &str| -> Vec<usize> {
            let call_lines: Vec<&str> = ptx[range.clone()]
                .lines()
                .filter(|line| line.trim_start().starts_with("call"))
                .collect();
            (0..func_names.len())
                .filter(|&i| {
                    func_names[i] != own
                        && call_lines
                            .iter()
                            .any(|line| line.contains(func_names[i].as_str()))
                })
                .collect()
        };
        let mut funcs = Vec::new();
        let mut entries = HashMap::new();
        for (entry, name, range) in items {
            let calls = calls_in(&range, &name);
            let item = Item {
                name: name.clone(),
                range,
                calls,
            };
            if entry {
                entries.insert(name, item);
            } else {
                funcs.push(item);
            }
        }
        PtxIndex {
            text,
            header,
            funcs,
            entries,
        }
    }

    /// Whether the PTX has the kernel `name`.
    pub fn has_entry(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The names of the kernels, in no order.
    #[allow(dead_code)] // xtask's check and the tests call it
    pub fn entry_names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// A module holding the kernel `name` alone: the header, every function it calls (directly or
    /// through another, in the file's order, so each is defined before its callers as in the
    /// file), then the kernel. `None` if the PTX has no such kernel.
    pub fn module_for(&self, name: &str) -> Option<String> {
        let entry = self.entries.get(name)?;
        let mut needed = vec![false; self.funcs.len()];
        let mut stack = entry.calls.clone();
        while let Some(i) = stack.pop() {
            if !needed[i] {
                needed[i] = true;
                stack.extend(self.funcs[i].calls.iter().copied());
            }
        }
        let mut module = self.header.clone();
        for (func, _) in self
            .funcs
            .iter()
            .zip(&needed)
            .filter(|(_, needed)| **needed)
        {
            module.push_str(&self.text[func.range.clone()]);
            module.push('\n');
        }
        module.push_str(&self.text[entry.range.clone()]);
        Some(module)
    }

    /// The functions `name`'s module defines besides the kernel.
    #[cfg(test)]
    pub fn funcs_in_module(&self, name: &str) -> Vec<&str> {
        let Some(module) = self.module_for(name) else {
            return Vec::new();
        };
        self.funcs
            .iter()
            .filter(|func| module.contains(&self.text[func.range.clone()]))
            .map(|func| func.name.as_str())
            .collect()
    }
}

/// `(is_entry, name)` of a line that opens a function: `.entry NAME(` or `.func NAME(` (a
/// `.func` may name its return value first: `.func (.param .b32 r) NAME(`), after any of
/// `.visible`, `.weak`, `.extern`.
fn function_name(line: &str) -> Option<(bool, String)> {
    let mut rest = line.trim_start();
    for prefix in [".visible ", ".weak ", ".extern "] {
        if let Some(r) = rest.strip_prefix(prefix) {
            rest = r.trim_start();
        }
    }
    let (entry, rest) = if let Some(r) = rest.strip_prefix(".entry ") {
        (true, r)
    } else if let Some(r) = rest.strip_prefix(".func ") {
        (false, r)
    } else {
        return None;
    };
    let mut rest = rest.trim_start();
    if !entry && rest.starts_with('(') {
        // The return value's parameter list.
        let close = rest.find(')')?;
        rest = rest[close + 1..].trim_start();
    }
    let name: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '$' || *c == '.')
        .collect();
    (!name.is_empty()).then_some((entry, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PTX: &str = "//\n.version 8.0\n.target sm_90\n.address_size 64\n\n\
        .extern .shared .align 16 .b8 smem[];\n\n\
        \t// .globl\tleaf\n.visible .func leaf(\n\t.param .b64 p\n)\n{\n\tret;\n}\n\
        .visible .func (.param .b32 r) mid(\n\t.param .b64 p\n)\n{\n\tcall.uni leaf, (p);\n\tret;\n}\n\
        .visible .func unused(\n\t.param .b64 p\n)\n{\n\tret;\n}\n\
        .visible .entry k_a(\n\t.param .align 16 .b8 k_a_param_0[8]\n)\n.maxnreg 64\n{\n\t\
        { .reg .pred p; }\n\tcall.uni (r), mid, (p);\n\tret;\n}\n\
        .visible .entry k_b(\n\t.param .b64 q\n)\n{\n\tret;\n}\n";

    #[test]
    fn each_kernel_gets_the_header_and_the_functions_it_calls_through_others() {
        let index = PtxIndex::parse(PTX.to_string());
        assert!(index.has_entry("k_a") && index.has_entry("k_b") && !index.has_entry("leaf"));
        let a = index.module_for("k_a").expect("k_a");
        assert!(
            a.starts_with("//\n.version 8.0\n.target sm_90\n.address_size 64\n"),
            "{a}"
        );
        assert!(a.contains(".extern .shared .align 16 .b8 smem[];"), "{a}");
        assert_eq!(index.funcs_in_module("k_a"), ["leaf", "mid"]);
        assert!(
            a.find(".func leaf(").unwrap() < a.find(") mid(").unwrap(),
            "{a}"
        );
        assert!(a.ends_with("\tret;\n}\n") && a.contains(".maxnreg 64\n{\n\t{ .reg .pred p; }"));
        assert!(!a.contains("k_b") && !a.contains("unused"), "{a}");
        let b = index.module_for("k_b").expect("k_b");
        assert!(index.funcs_in_module("k_b").is_empty());
        assert!(
            b.contains(".visible .entry k_b(") && !b.contains(".func"),
            "{b}"
        );
        assert!(index.module_for("k_c").is_none());
    }

    #[test]
    fn a_declaration_without_a_body_stays_in_the_header() {
        let ptx = ".version 8.0\n.extern .func (.param .b32 r) vprintf(\n\t.param .b64 f\n)\n;\n\
                   .visible .entry k(\n)\n{\n\tret;\n}\n";
        let index = PtxIndex::parse(ptx.to_string());
        let k = index.module_for("k").expect("k");
        assert!(
            k.contains("vprintf(\n\t.param .b64 f\n)\n;\n.visible .entry k("),
            "{k}"
        );
    }

    #[test]
    fn the_committed_ptx_splits_into_every_entry_point() {
        // By path, not through `crate::kernels`: xtask includes this file too.
        for ptx in [
            include_str!("../ptx/sm_90.ptx"),
            include_str!("../ptx/sm_80.ptx"),
            include_str!("../ptx/sm_90a.ptx"),
        ] {
            let index = PtxIndex::parse(ptx.to_string());
            let entries = ptx
                .lines()
                .filter(|l| l.starts_with(".visible .entry "))
                .count();
            assert!(entries > 0);
            assert_eq!(index.entry_names().count(), entries);
            for name in index.entry_names() {
                let module = index.module_for(name).expect("module");
                assert_eq!(module.matches(".entry ").count(), 1, "{name}");
                // Every call's target is defined in the module.
                for call in module
                    .lines()
                    .filter(|l| l.trim_start().starts_with("call"))
                {
                    let target = call
                        .split([' ', '\t', ','])
                        .filter(|w| !w.is_empty())
                        .find(|w| w.starts_with('_') || w.starts_with("xent"))
                        .expect("a call's target");
                    assert!(
                        module.contains(&format!(".func {target}(")),
                        "{name} calls {target}, not defined in its module"
                    );
                }
            }
        }
    }
}
