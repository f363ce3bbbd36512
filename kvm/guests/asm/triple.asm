# triple (long mode): load an IDT with limit 0 and execute ud2. The #UD
# cannot be delivered (#GP, then #DF, neither deliverable), so the CPU
# triple-faults: the VMM sees a shutdown exit.
.intel_syntax noprefix
.code64
.text
.include "abi.inc"
.globl _start
_start:
    test edi, edi                 # only vCPU 0 faults; the others park
    jnz park
    lidt [rip + idtr]
    ud2
    jmp park                      # not reached

idtr: .word 0                     # limit 0: no vector is valid
      .quad 0

.include "lib64.inc"
