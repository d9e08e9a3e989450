//! A seccomp filter that makes `bpf()` fail with ENOSYS, as on a kernel built without BPF: for
//! proving that `lbd` starts there and `mode = "auto"` falls back to IPVS.

use std::{os::unix::process::CommandExt, process::Command};

/// `AUDIT_ARCH_X86_64`.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// Installs the filter in the child between fork and exec; it is inherited by everything the child
/// executes (`ip netns exec` → `lbd`).
pub fn block_bpf(cmd: &mut Command) {
    // SAFETY: only async-signal-safe calls (prctl) run between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let stmt = |code: u32, k: u32| libc::sock_filter { code: code as u16, jt: 0, jf: 0, k };
            let jump = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter { code: code as u16, jt, jf, k };
            let ld_w_abs = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
            let jeq_k = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
            let ret_k = libc::BPF_RET | libc::BPF_K;
            let filter = [
                // struct seccomp_data { int nr; __u32 arch; ... }
                stmt(ld_w_abs, 4),
                jump(jeq_k, AUDIT_ARCH_X86_64, 1, 0),
                stmt(ret_k, libc::SECCOMP_RET_ALLOW),
                stmt(ld_w_abs, 0),
                jump(jeq_k, libc::SYS_bpf as u32, 0, 1),
                stmt(ret_k, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
                stmt(ret_k, libc::SECCOMP_RET_ALLOW),
            ];
            let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut _ };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const _ as usize, 0, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
