# boot64.asm: QEMU-only test harness (never a kvmkit guest). A disk image
# made of this trampoline (8 sectors, linked at 0x7C00) followed by a
# long-mode guest boots under SeaBIOS and enters the guest exactly as
# kvmkit's bare-metal ABI says: image copied to 0x100000, 64-bit mode, the
# first 4 GiB identity-mapped with 2 MiB pages, flat segments, interrupts
# off, RSP = 0x80000 - index*0x4000, RDI = vCPU index, RSI = vCPU count,
# RDX = RAM size; every vCPU (the APs are started with INIT-SIPI) jumps to
# the first byte. The page tables live at 0x20000 here.
#
# Assemble with --defsym for: NCPUS, RAMSIZE, GUEST_BYTES, GUEST_SECTORS,
# P_ITERS, P_DSIZE, P_PASSES (the parameter block), CORRUPT (0, or a
# guest-physical address whose qword is set to 0xBAD before the start).
.intel_syntax noprefix
.code16
.text
.globl _start
.set TRAMP_SECTORS, 8             # this trampoline: 0x7C00..0x8BFF
.set GUEST_BUF,   0x7C00 + TRAMP_SECTORS * 512
.set PML4,        0x20000
.set AP_COUNT,    0x5000          # APs that reached long mode

_start:
    cli
    cld
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7C00
    ljmp 0, offset 1f             # CS = 0
1:  mov si, offset dap            # DL = boot drive (from the BIOS)
    mov ah, 0x42
    int 0x13
    jc fail16
    jmp stage2
fail16:
    mov al, 0x7E
    out 0xF4, al
    hlt

.align 4
dap: .byte 0x10, 0
     .word TRAMP_SECTORS - 1 + GUEST_SECTORS
     .word 0, 0x07E0              # buffer 07E0:0000 = 0x7E00
     .quad 1                      # from LBA 1

.org 0x1FE
.word 0xAA55

# AP entry: SIPI vector 0x08 starts the AP at 0800:0000 = 0x8000.
.org 0x400
ap16:
    ljmp 0, offset 1f
1:  cli
    cld
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov bx, 1                     # AP
    jmp golong

stage2:
    in al, 0x92                   # fast A20
    or al, 2
    and al, 0xFE
    out 0x92, al
    mov ax, PML4 >> 4             # page tables: zero 6 pages at 0x20000
    mov es, ax
    xor di, di
    xor eax, eax
    mov cx, 0x6000 / 4
    rep stosd
    mov dword ptr es:[0x0000], PML4 + 0x1003          # PML4[0] -> PDPT
    mov dword ptr es:[0x1000], PML4 + 0x2003          # PDPT[0..3] -> PDs
    mov dword ptr es:[0x1008], PML4 + 0x3003
    mov dword ptr es:[0x1010], PML4 + 0x4003
    mov dword ptr es:[0x1018], PML4 + 0x5003
    mov di, 0x2000                # 2048 PD entries: 2 MiB pages
    mov eax, 0x83                 # present, writable, page size
    mov cx, 2048
2:  mov dword ptr es:[di], eax
    add eax, 0x200000
    add di, 8
    loop 2b
    xor ax, ax
    mov es, ax
    xor bx, bx                    # BSP

golong:
    lgdt [gdtr]
    mov eax, cr4
    or eax, 0x620                 # PAE | OSFXSR | OSXMMEXCPT
    mov cr4, eax
    mov eax, PML4
    mov cr3, eax
    mov ecx, 0xC0000080           # EFER.LME
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    and eax, 0xFFFFFFFB           # EM off
    or eax, 0x80000003            # PG | MP | PE
    mov cr0, eax
    ljmp 0x08, offset long64

.code64
long64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    test bx, bx
    jnz ap64
    mov rsp, 0x80000
    movabs rax, P_ITERS           # parameter block
    mov qword ptr [0x6000], rax
    movabs rax, P_DSIZE
    mov qword ptr [0x6008], rax
    movabs rax, P_PASSES
    mov qword ptr [0x6010], rax
    mov dword ptr [0x7000], 0
    mov dword ptr [AP_COUNT], 0
    mov esi, GUEST_BUF            # copy the guest to 0x100000
    mov edi, 0x100000
    mov ecx, GUEST_BYTES
    rep movsb
.if CORRUPT
    mov eax, CORRUPT
    mov qword ptr [rax], 0xBAD
.endif
.if NCPUS > 1
    mov ebx, 0xFEE00000           # local APIC
    mov dword ptr [rbx + 0xF0], 0x1FF        # software-enable
    mov dword ptr [rbx + 0x310], 0
    mov dword ptr [rbx + 0x300], 0x000C4500  # INIT to all but self
    call icr_wait
    mov dword ptr [rbx + 0x300], 0x000C4608  # SIPI, vector 0x08
    call icr_wait
    mov ecx, 0x40000000           # wait for the APs (bounded)
3:  cmp dword ptr [AP_COUNT], NCPUS - 1
    jae 4f
    pause
    dec ecx
    jnz 3b
    mov al, 0x7D                  # APs did not come up
    out 0xF4, al
    hlt
4:
.endif
    xor edi, edi
    mov esi, NCPUS
    movabs rdx, RAMSIZE
    mov eax, 0x100000
    jmp rax

icr_wait:
    test dword ptr [rbx + 0x300], 0x1000
    jz 1f
    pause
    jmp icr_wait
1:  ret

ap64:
    mov eax, 1
    lock xadd dword ptr [AP_COUNT], eax
    inc eax                       # index: 1, 2, ...
    mov edi, eax
    imul eax, eax, 0x4000
    mov esp, 0x80000
    sub rsp, rax
    mov esi, NCPUS
    movabs rdx, RAMSIZE
    mov eax, 0x100000
    jmp rax

.align 8
gdt:  .quad 0
      .quad 0x00AF9A000000FFFF    # 0x08: 64-bit code
      .quad 0x00CF92000000FFFF    # 0x10: flat data
gdtr: .word gdtr - gdt - 1
      .long gdt

.org TRAMP_SECTORS * 512
