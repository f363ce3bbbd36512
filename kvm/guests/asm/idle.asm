# idle (long mode): vCPU 0 prints "idle" on COM1, then every vCPU halts
# forever. For idle-VM (e.g. migration) benchmarks.
.intel_syntax noprefix
.code64
.text
.include "abi.inc"
.globl _start
_start:
    test edi, edi
    jnz park
    cld
    lea rsi, [rip + msg]
    call puts
    jmp park

msg: .asciz "idle\r\n"

.include "lib64.inc"
