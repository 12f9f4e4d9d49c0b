//! `cargo xtask sass KERNEL [ARCH]`: one kernel of the committed PTX compiled with the pinned
//! `ptxas` and disassembled with `nvdisasm` (PyPI's `nvidia-cuda-nvdisasm`, into `.tools/`), with
//! no GPU: the SASS in `target/sass/<kernel>-<arch>.sass` and, per loop (a backward branch), its
//! instruction count and the instructions that set a kernel's speed (shared and global loads and
//! stores, `ex2`, tensor-core MMAs). Counts are static: a loop's cold branches (a fallback, the
//! vector holding the label) are in them; read the file for the hot path.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::ptx::{ARCHES, committed_path};
use crate::ptxas::{ensure_ptxas, ensure_tool};
use crate::{Result, capture, relative, stdout_of, step};

/// The `nvidia-cuda-nvdisasm` release (it reads the cubins of the pinned `ptxas`).
const NVDISASM_WHEEL_VERSION: &str = "13.5.37";
/// The path of `nvdisasm` inside that wheel.
const NVDISASM_IN_WHEEL: &str = "nvidia/cu13/bin/nvdisasm";

/// Opcodes (prefixes) counted per loop.
const COUNTED: [&str; 9] = [
    "LDS", "STS", "LDG", "STG", "LDGSTS", "LDSM", "MUFU.EX2", "HMMA", "HGMMA",
];

/// A loop of the disassembly: instructions `[start, end]` (indices), closed by a branch back to
/// `start`.
#[derive(Debug, PartialEq)]
struct Loop {
    start: usize,
    end: usize,
}

pub fn command(root: &Path, args: &[String]) -> Result<()> {
    let (kernel, arch) = match args {
        [kernel] => (kernel.as_str(), "sm_90"),
        [kernel, arch] => (kernel.as_str(), arch.as_str()),
        _ => {
            return Err(
                "usage: cargo xtask sass KERNEL [ARCH] (ARCH: sm_80, sm_90 (default), sm_90a)"
                    .into(),
            );
        }
    };
    let Some(arch_entry) = ARCHES.iter().find(|a| a.name == arch) else {
        return Err(format!(
            "unknown architecture {arch}: sm_80, sm_90 or sm_90a"
        ));
    };
    let ptxas = ensure_ptxas(root)?;
    let nvdisasm = ensure_tool(
        root,
        "nvidia-cuda-nvdisasm",
        NVDISASM_WHEEL_VERSION,
        NVDISASM_IN_WHEEL,
        "nvdisasm",
    )?;
    let dir = root.join("target/sass");
    fs::create_dir_all(&dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    let cubin = dir.join(format!("{kernel}-{arch}.cubin"));
    // ptxas reports registers and spills on stderr.
    let compiled = capture(
        Command::new(&ptxas)
            .arg(format!("-arch={arch}"))
            .args(["-v", "-e", kernel])
            .arg(committed_path(root, arch_entry))
            .arg("-o")
            .arg(&cubin),
    )?;
    let report = String::from_utf8_lossy(&compiled.stderr).into_owned();
    if !compiled.status.success() {
        return Err(format!("ptxas failed on {kernel} ({arch}):\n{report}"));
    }
    let sass = stdout_of(Command::new(&nvdisasm).arg("-c").arg(&cubin))?;
    let sass_path = dir.join(format!("{kernel}-{arch}.sass"));
    fs::write(&sass_path, &sass)
        .map_err(|err| format!("cannot write {}: {err}", sass_path.display()))?;
    let entries = instructions(&sass);
    let count = |body: &[String]| body.iter().filter(|i| !is_label(i)).count();
    if count(&entries) == 0 {
        return Err(format!(
            "nvdisasm printed no instructions for {kernel} ({arch})"
        ));
    }
    step(&format!(
        "{kernel} ({arch}): {} instructions, SASS in {}",
        count(&entries),
        relative(root, &sass_path)
    ));
    for line in report
        .lines()
        .filter(|l| l.contains("registers") || l.contains("spill"))
    {
        println!("{}", line.trim());
    }
    // `start` and `end` index the SASS's entries (instructions and labels).
    println!(
        "{:>6} {:>6} {:>6}  {}",
        "start",
        "end",
        "instrs",
        COUNTED.join(" ")
    );
    for l in loops(&entries) {
        let body = &entries[l.start..=l.end];
        let counts: Vec<String> = COUNTED
            .iter()
            .map(|op| {
                body.iter()
                    .filter(|i| is_op(opcode(i), op))
                    .count()
                    .to_string()
            })
            .collect();
        println!(
            "{:>6} {:>6} {:>6}  {}",
            l.start,
            l.end,
            count(body),
            counts.join(" ")
        );
    }
    Ok(())
}

/// The instructions of `nvdisasm -c` output, in order, with labels as `.L_x_N:` entries of their
/// own (kept, so that branches can find them).
fn instructions(sass: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in sass.lines() {
        let line = line.trim();
        if line.starts_with(".L_x_") && line.ends_with(':') {
            out.push(line.to_string());
        } else if let Some(rest) = line.strip_prefix("/*")
            && let Some((addr, text)) = rest.split_once("*/")
            && addr.chars().all(|c| c.is_ascii_hexdigit())
            && !addr.is_empty()
        {
            let text = text.trim().trim_end_matches(';').trim();
            // `@!PT` never runs: ptxas's padding.
            if !text.is_empty() && !text.starts_with("@!PT ") {
                out.push(text.to_string());
            }
        }
    }
    out
}

/// Whether `opcode` is `op`: the whole name before its first `.` (`LDS` is not `LDSM`), or with
/// `op`'s own suffix (`MUFU.EX2`).
fn is_op(opcode: &str, op: &str) -> bool {
    if op.contains('.') {
        opcode == op || opcode.starts_with(&format!("{op}."))
    } else {
        opcode.split('.').next() == Some(op)
    }
}

/// Whether an entry of [`instructions`] is a label, not an instruction.
fn is_label(entry: &str) -> bool {
    entry.starts_with(".L_x_") && entry.ends_with(':')
}

/// An instruction's opcode: its first word after any predicate (`@P0`, `@!P1`).
fn opcode(instruction: &str) -> &str {
    let mut words = instruction.split_whitespace();
    let first = words.next().unwrap_or("");
    if first.starts_with('@') {
        words.next().unwrap_or("")
    } else {
        first
    }
}

/// The loops: every branch to a label at or before it.
fn loops(instructions: &[String]) -> Vec<Loop> {
    let label_at = |name: &str| {
        instructions
            .iter()
            .position(|i| i.trim_end_matches(':') == name)
    };
    let mut found = Vec::new();
    for (end, instruction) in instructions.iter().enumerate() {
        if !opcode(instruction).starts_with("BRA") {
            continue;
        }
        let Some(target) = instruction
            .split("`(")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
        else {
            continue;
        };
        if let Some(start) = label_at(target)
            && start <= end
        {
            found.push(Loop { start, end });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDS.128 R4, [R2] ;
        /*0020*/                   MUFU.EX2 R5, R4 ;
        /*0030*/              @!P0 BRA `(.L_x_1) ;
        /*0040*/                   STG.E.128 desc[UR4][R6.64], R4 ;
        /*0050*/                   EXIT ;
";

    #[test]
    fn a_backward_branch_makes_a_loop_and_the_counts_see_its_opcodes() {
        let instructions = instructions(SAMPLE);
        assert_eq!(instructions.len(), 7, "{instructions:?}");
        assert_eq!(loops(&instructions), vec![Loop { start: 1, end: 4 }]);
        assert_eq!(opcode(&instructions[4]), "BRA");
        assert_eq!(opcode(&instructions[3]), "MUFU.EX2");
        assert!(is_op("LDS.128", "LDS") && !is_op("LDSM.16.M88.4", "LDS"));
        assert!(is_op("MUFU.EX2", "MUFU.EX2") && !is_op("MUFU.RCP", "MUFU.EX2"));
        assert!(!is_op("LDGSTS.E.BYPASS.128", "LDG"));
    }
}
