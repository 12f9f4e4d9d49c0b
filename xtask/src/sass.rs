//! `cargo xtask sass KERNEL [ARCH] [--ptx FILE] [--maxnreg N]`: one kernel of the committed PTX
//! (or of FILE, a variant) compiled with the pinned `ptxas` (at its own register cap, or at N)
//! and disassembled with `nvdisasm` (PyPI's `nvidia-cuda-nvdisasm`, into `.tools/`), with no GPU:
//! the SASS in `target/sass/<kernel>-<arch>.sass`, with each instruction's live registers
//! (`nvdisasm -plr`), and per loop (a backward branch) its instruction count, the most registers
//! live in it, and the instructions that set a kernel's speed (shared and global loads and
//! stores, `ex2`, tensor-core MMAs, spills' local loads and stores). Counts are static: a loop's
//! cold branches (a fallback, the vector holding the label) are in them; read the file for the
//! hot path. Spills outside the loops are paid too, once a row (session 32: the soft cap's
//! kernels lost 6 points of copy bandwidth at 48 registers with none inside a loop).

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
const COUNTED: [&str; 11] = [
    "LDS", "STS", "LDG", "STG", "LDGSTS", "LDSM", "MUFU.EX2", "HMMA", "HGMMA", "LDL", "STL",
];

const USAGE: &str = "usage: cargo xtask sass KERNEL [ARCH] [--ptx FILE] [--maxnreg N] \
                     (ARCH: sm_80, sm_90 (default), sm_90a)";

/// What `cargo xtask sass` was asked for.
#[derive(Debug, PartialEq)]
struct Request {
    kernel: String,
    arch: String,
    /// A PTX file to read instead of the committed one.
    ptx: Option<String>,
    /// A register cap to compile the kernel at instead of its own `.maxnreg`.
    maxnreg: Option<u32>,
}

/// Parses `KERNEL [ARCH] [--ptx FILE] [--maxnreg N]` (options anywhere).
fn parse_request(args: &[String]) -> Result<Request> {
    let (mut positional, mut ptx, mut maxnreg) = (Vec::new(), None, None);
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--ptx" => ptx = Some(rest.next().ok_or(USAGE)?.clone()),
            "--maxnreg" => {
                let value = rest.next().ok_or(USAGE)?;
                let cap = value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (16..=255).contains(n))
                    .ok_or_else(|| format!("--maxnreg {value}: expected 16 to 255 registers"))?;
                maxnreg = Some(cap);
            }
            other if other.starts_with("--") => {
                return Err(format!("unknown option {other}\n{USAGE}"));
            }
            other => positional.push(other.to_string()),
        }
    }
    let (kernel, arch) = match positional.as_slice() {
        [kernel] => (kernel.clone(), "sm_90".to_string()),
        [kernel, arch] => (kernel.clone(), arch.clone()),
        _ => return Err(USAGE.to_string()),
    };
    Ok(Request {
        kernel,
        arch,
        ptx,
        maxnreg,
    })
}

/// `ptx` with entry `kernel`'s register cap set to `cap`: its `.maxnreg` line replaced, or one
/// inserted before its body. `None` if the file has no such entry.
fn with_maxnreg(ptx: &str, kernel: &str, cap: u32) -> Option<String> {
    let head = format!(".visible .entry {kernel}(");
    let at = ptx.find(&head)?;
    // The body opens with a line holding only `{`, after the parameter list.
    let open = at + ptx[at..].find("\n{\n")? + 1;
    let before = &ptx[..open];
    let line = format!(".maxnreg {cap}\n");
    let decl_start = before[at..].rfind(".maxnreg ").map(|i| at + i);
    Some(match decl_start {
        Some(start) => format!("{}{line}{}", &ptx[..start], &ptx[open..]),
        None => format!("{before}{line}{}", &ptx[open..]),
    })
}

/// A loop of the disassembly: instructions `[start, end]` (indices), closed by a branch back to
/// `start`.
#[derive(Debug, PartialEq)]
struct Loop {
    start: usize,
    end: usize,
}

pub fn command(root: &Path, args: &[String]) -> Result<()> {
    let request = parse_request(args)?;
    let (kernel, arch) = (request.kernel.as_str(), request.arch.as_str());
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
    let mut source = match &request.ptx {
        Some(file) => std::path::PathBuf::from(file),
        None => committed_path(root, arch_entry),
    };
    if !source.is_file() {
        return Err(format!("no PTX file {}", source.display()));
    }
    if let Some(cap) = request.maxnreg {
        let text = fs::read_to_string(&source)
            .map_err(|err| format!("cannot read {}: {err}", source.display()))?;
        let capped = with_maxnreg(&text, kernel, cap)
            .ok_or_else(|| format!("{} has no entry {kernel}", source.display()))?;
        source = dir.join(format!("{kernel}-{arch}.ptx"));
        fs::write(&source, capped)
            .map_err(|err| format!("cannot write {}: {err}", source.display()))?;
    }
    // ptxas reports registers and spills on stderr.
    let compiled = capture(
        Command::new(&ptxas)
            .arg(format!("-arch={arch}"))
            .args(["-v", "-e", kernel])
            .arg(&source)
            .arg("-o")
            .arg(&cubin),
    )?;
    let report = String::from_utf8_lossy(&compiled.stderr).into_owned();
    if !compiled.status.success() {
        return Err(format!("ptxas failed on {kernel} ({arch}):\n{report}"));
    }
    // `-plr`: each instruction's live registers, after a `//` on its line.
    let sass = stdout_of(Command::new(&nvdisasm).args(["-c", "-plr"]).arg(&cubin))?;
    let sass_path = dir.join(format!("{kernel}-{arch}.sass"));
    fs::write(&sass_path, &sass)
        .map_err(|err| format!("cannot write {}: {err}", sass_path.display()))?;
    let (entries, live) = instructions(&sass);
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
    let most_live = |from: usize, to: usize| live[from..=to].iter().flatten().max().copied();
    if let Some(most) = most_live(0, entries.len() - 1) {
        println!("most registers live at once: {most}");
    }
    println!(
        "{:>6} {:>6} {:>6} {:>4}  {}",
        "start",
        "end",
        "instrs",
        "live",
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
        let most = most_live(l.start, l.end).map_or("-".to_string(), |n| n.to_string());
        println!(
            "{:>6} {:>6} {:>6} {:>4}  {}",
            l.start,
            l.end,
            count(body),
            most,
            counts.join(" ")
        );
    }
    Ok(())
}

/// The instructions of `nvdisasm -c` output, in order, with labels as `.L_x_N:` entries of their
/// own (kept, so that branches can find them), and beside each the registers live there where
/// the output has them (`-plr`: `// | N ...` after the instruction; `None` for labels).
fn instructions(sass: &str) -> (Vec<String>, Vec<Option<u32>>) {
    let (mut out, mut live) = (Vec::new(), Vec::new());
    for line in sass.lines() {
        let line = line.trim();
        // A label's line may carry a `-plr` comment too.
        let label = line.split("//").next().unwrap_or("").trim();
        if label.starts_with(".L_x_") && label.ends_with(':') {
            out.push(label.to_string());
            live.push(None);
        } else if let Some(rest) = line.strip_prefix("/*")
            && let Some((addr, text)) = rest.split_once("*/")
            && addr.chars().all(|c| c.is_ascii_hexdigit())
            && !addr.is_empty()
        {
            let (text, comment) = text.split_once(';').unwrap_or((text, ""));
            let text = text.trim();
            // `@!PT` never runs: ptxas's padding.
            if !text.is_empty() && !text.starts_with("@!PT ") {
                out.push(text.to_string());
                live.push(live_registers(comment));
            }
        }
    }
    (out, live)
}

/// The live general registers in an `nvdisasm -plr` comment (`// | 17 ^ : ...`).
fn live_registers(comment: &str) -> Option<u32> {
    comment
        .trim()
        .strip_prefix("//")?
        .trim()
        .strip_prefix('|')?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
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
        let (instructions, live) = instructions(SAMPLE);
        assert!(live.iter().all(Option::is_none));
        assert_eq!(instructions.len(), 7, "{instructions:?}");
        assert_eq!(loops(&instructions), vec![Loop { start: 1, end: 4 }]);
        assert_eq!(opcode(&instructions[4]), "BRA");
        assert_eq!(opcode(&instructions[3]), "MUFU.EX2");
        assert!(is_op("LDS.128", "LDS") && !is_op("LDSM.16.M88.4", "LDS"));
        assert!(is_op("MUFU.EX2", "MUFU.EX2") && !is_op("MUFU.RCP", "MUFU.EX2"));
        assert!(!is_op("LDGSTS.E.BYPASS.128", "LDG"));
    }

    #[test]
    fn live_registers_come_from_the_plr_comment_and_labels_have_none() {
        let sass = "        /*0000*/                   LDC R1, c[0x0][0x28] ;   // | 17 ^ : : | 1 : |\n\
                    .L_x_3:        // | 17 : : : | 1 : |\n\
                    \x20       /*0010*/              @!P0 BRA `(.L_x_3) ;     // |  9 : : | 1 : |\n";
        let (instructions, live) = instructions(sass);
        assert_eq!(
            instructions,
            ["LDC R1, c[0x0][0x28]", ".L_x_3:", "@!P0 BRA `(.L_x_3)"]
        );
        assert_eq!(live, [Some(17), None, Some(9)]);
        assert_eq!(live_registers("// |"), None);
    }

    #[test]
    fn a_request_takes_options_anywhere_and_refuses_bad_ones() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert_eq!(
            parse_request(&args("k --maxnreg 64 sm_80 --ptx v.ptx")).unwrap(),
            Request {
                kernel: "k".into(),
                arch: "sm_80".into(),
                ptx: Some("v.ptx".into()),
                maxnreg: Some(64)
            }
        );
        assert_eq!(parse_request(&args("k")).unwrap().arch, "sm_90");
        assert!(parse_request(&args("k --maxnreg 8")).is_err());
        assert!(parse_request(&args("k --maxnreg")).is_err());
        assert!(parse_request(&args("k --bogus")).is_err());
        assert!(parse_request(&args("a b c")).is_err());
    }

    #[test]
    fn the_register_cap_is_replaced_or_inserted_for_that_entry_only() {
        let ptx = ".visible .entry a(\n\t.param .u64 a_0\n)\n.maxnreg 72\n{\n\tret;\n}\n\
                   .visible .entry b(\n\t.param .u64 b_0\n)\n{\n\tret;\n}\n";
        let a = with_maxnreg(ptx, "a", 64).unwrap();
        assert!(a.contains(")\n.maxnreg 64\n{") && !a.contains("72"), "{a}");
        assert_eq!(a.matches(".maxnreg").count(), 1);
        let b = with_maxnreg(ptx, "b", 48).unwrap();
        assert!(
            b.contains("b_0\n)\n.maxnreg 48\n{") && b.contains(".maxnreg 72"),
            "{b}"
        );
        assert!(with_maxnreg(ptx, "c", 48).is_none());
    }
}
