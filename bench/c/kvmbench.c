/*
 * kvmbench.c: C reference for kvmkit's run-loop benchmarks.
 *
 * Measures, with raw /dev/kvm ioctls and nothing else, what kvmkit's Go
 * benchmarks measure, on the same guest binaries (kvm/guests/NAME.bin):
 *
 *   pio_exit_ns                 ns per KVM_EXIT_IO: long-mode pioloop, N outb
 *                               to port 0xE0, each exit handled by doing nothing
 *   mmio_exit_ns                ns per KVM_EXIT_MMIO: long-mode mmioloop, N
 *                               4-byte writes to 0xD0000000 (no memory slot)
 *   create_to_first_exit_ns     KVM_CREATE_VM, one memory slot, one vCPU,
 *                               real-mode exit42_16, KVM_RUN to its first exit
 *                               (outb 42 to port 0xF4), close everything
 *
 * The long-mode setup follows kvmkit's bare-metal guest ABI: image at
 * 0x100000, entry at its first byte in 64-bit mode, first 4 GiB identity-
 * mapped with 2 MiB pages (PML4 0x9000, PDPT 0xA000, PDs 0xB000-0xEFFF),
 * flat segments (GDT at 0x1000: 0x08 code64, 0x10 data), no IDT, SSE on,
 * RSP = 0x80000, RDI = 0, RSI = 1, RDX = RAM size, parameter block at 0x6000.
 *
 * Each exit measurement runs -k times (after one short warm-up run) and the
 * minimum is printed, matching bench/kvm-exit.sh which takes the minimum of
 * `go test -count`.
 *
 * Usage: kvmbench [-n iters] [-r repeats] [-k runs]
 *                 [-p pioloop.bin] [-m mmioloop.bin] [-c exit42_16.bin]
 * Build: gcc -O2 -Wall -o kvmbench kvmbench.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define LONG_LOAD 0x100000ULL
#define REAL_LOAD 0x7C00ULL
#define PARAM_BLOCK 0x6000ULL
#define GDT_ADDR 0x1000ULL
#define PML4_ADDR 0x9000ULL
#define STACK_TOP 0x80000ULL
#define EXIT_PORT 0xF4
#define PIO_PORT 0xE0
#define MMIO_ADDR 0xD0000000ULL
#define TSS_ADDR 0xFFFBD000UL

#define LONG_RAM (4ULL << 20)   /* enough for tables, stacks and the image */
#define CREATE_RAM (1ULL << 20) /* real mode: the first MiB */

static void die(const char *what)
{
	fprintf(stderr, "kvmbench: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fail(const char *fmt, const char *arg)
{
	fprintf(stderr, "kvmbench: ");
	fprintf(stderr, fmt, arg);
	fprintf(stderr, "\n");
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

struct image {
	uint8_t *data;
	size_t len;
};

static struct image read_image(const char *path, size_t max)
{
	struct image img = {0};
	FILE *f = fopen(path, "rb");
	if (!f)
		fail("open %s failed", path);
	img.data = malloc(max);
	if (!img.data)
		die("malloc");
	img.len = fread(img.data, 1, max, f);
	if (img.len == 0 || img.len == max)
		fail("%s: empty or too large", path);
	fclose(f);
	return img;
}

struct vm {
	int vmfd, cpufd;
	uint8_t *mem;
	size_t memsize;
	struct kvm_run *run;
	size_t runsize;
};

static void vm_create(struct vm *vm, int kvm, size_t memsize)
{
	vm->memsize = memsize;
	vm->vmfd = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm->vmfd < 0)
		die("KVM_CREATE_VM");
	/* Intel needs a TSS area for real mode; harmless on AMD. */
	if (ioctl(vm->vmfd, KVM_SET_TSS_ADDR, TSS_ADDR) < 0)
		die("KVM_SET_TSS_ADDR");
	vm->mem = mmap(NULL, memsize, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (vm->mem == MAP_FAILED)
		die("mmap guest memory");
	struct kvm_userspace_memory_region region = {
		.slot = 0,
		.guest_phys_addr = 0,
		.memory_size = memsize,
		.userspace_addr = (uintptr_t)vm->mem,
	};
	if (ioctl(vm->vmfd, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	vm->cpufd = ioctl(vm->vmfd, KVM_CREATE_VCPU, 0);
	if (vm->cpufd < 0)
		die("KVM_CREATE_VCPU");
	int runsize = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (runsize <= 0)
		die("KVM_GET_VCPU_MMAP_SIZE");
	vm->runsize = (size_t)runsize;
	vm->run = mmap(NULL, vm->runsize, PROT_READ | PROT_WRITE, MAP_SHARED,
		       vm->cpufd, 0);
	if (vm->run == MAP_FAILED)
		die("mmap kvm_run");
}

static void vm_destroy(struct vm *vm)
{
	munmap(vm->run, vm->runsize);
	close(vm->cpufd);
	close(vm->vmfd);
	munmap(vm->mem, vm->memsize);
}

/* set_cpuid hands the vCPU everything KVM supports (long mode needs LM). */
static void set_cpuid(int kvm, int cpufd)
{
	int n = 256;
	struct kvm_cpuid2 *cpuid =
		calloc(1, sizeof(*cpuid) + n * sizeof(struct kvm_cpuid_entry2));
	if (!cpuid)
		die("calloc");
	cpuid->nent = n;
	if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
		die("KVM_GET_SUPPORTED_CPUID");
	if (ioctl(cpufd, KVM_SET_CPUID2, cpuid) < 0)
		die("KVM_SET_CPUID2");
	free(cpuid);
}

static void put64(uint8_t *mem, uint64_t gpa, uint64_t v)
{
	memcpy(mem + gpa, &v, sizeof(v));
}

/* setup_long builds the ABI's page tables and GDT and enters 64-bit mode. */
static void setup_long(int kvm, struct vm *vm, const struct image *img,
		       uint64_t iters)
{
	uint8_t *m = vm->mem;
	memcpy(m + LONG_LOAD, img->data, img->len);
	put64(m, PARAM_BLOCK, iters);

	/* PML4[0] -> PDPT; PDPT[0..3] -> 4 PDs; 2048 x 2 MiB pages. */
	put64(m, PML4_ADDR, (PML4_ADDR + 0x1000) | 3);
	for (int i = 0; i < 4; i++)
		put64(m, PML4_ADDR + 0x1000 + 8 * i,
		      (PML4_ADDR + 0x2000 + 0x1000 * i) | 3);
	for (uint64_t i = 0; i < 2048; i++)
		put64(m, PML4_ADDR + 0x2000 + 8 * i, (i << 21) | 0x83);

	put64(m, GDT_ADDR, 0);
	put64(m, GDT_ADDR + 8, 0x00AF9A000000FFFFULL);  /* 64-bit code */
	put64(m, GDT_ADDR + 16, 0x00CF92000000FFFFULL); /* flat data */

	set_cpuid(kvm, vm->cpufd);

	struct kvm_sregs s;
	if (ioctl(vm->cpufd, KVM_GET_SREGS, &s) < 0)
		die("KVM_GET_SREGS");
	struct kvm_segment code = {
		.base = 0, .limit = 0xFFFFFFFF, .selector = 0x08, .type = 11,
		.present = 1, .dpl = 0, .db = 0, .s = 1, .l = 1, .g = 1,
	};
	struct kvm_segment data = code;
	data.selector = 0x10;
	data.type = 3;
	data.db = 1;
	data.l = 0;
	s.cs = code;
	s.ds = s.es = s.fs = s.gs = s.ss = data;
	s.gdt.base = GDT_ADDR;
	s.gdt.limit = 3 * 8 - 1;
	s.idt.base = 0;
	s.idt.limit = 0;
	s.cr3 = PML4_ADDR;
	s.cr4 = 0x20 | 0x200 | 0x400;         /* PAE, OSFXSR, OSXMMEXCPT */
	s.cr0 = 0x80000000 | 0x20 | 0x10 | 0x2 | 0x1; /* PG NE ET MP PE */
	s.efer = 0x500;                       /* LME, LMA */
	if (ioctl(vm->cpufd, KVM_SET_SREGS, &s) < 0)
		die("KVM_SET_SREGS (long mode)");

	struct kvm_regs r = {0};
	r.rip = LONG_LOAD;
	r.rsp = STACK_TOP;
	r.rdi = 0;
	r.rsi = 1;
	r.rdx = vm->memsize;
	r.rflags = 2;
	if (ioctl(vm->cpufd, KVM_SET_REGS, &r) < 0)
		die("KVM_SET_REGS");
}

static void setup_real(struct vm *vm, const struct image *img)
{
	memcpy(vm->mem + REAL_LOAD, img->data, img->len);
	struct kvm_sregs s;
	if (ioctl(vm->cpufd, KVM_GET_SREGS, &s) < 0)
		die("KVM_GET_SREGS");
	s.cs.selector = 0;
	s.cs.base = 0;
	s.ds.selector = s.es.selector = s.ss.selector = 0;
	s.ds.base = s.es.base = s.ss.base = 0;
	if (ioctl(vm->cpufd, KVM_SET_SREGS, &s) < 0)
		die("KVM_SET_SREGS (real mode)");
	struct kvm_regs r = {0};
	r.rip = REAL_LOAD;
	r.rsp = REAL_LOAD;
	r.rflags = 2;
	if (ioctl(vm->cpufd, KVM_SET_REGS, &r) < 0)
		die("KVM_SET_REGS");
}

static void bad_exit(struct kvm_run *run)
{
	fprintf(stderr, "kvmbench: unexpected exit reason %u", run->exit_reason);
	if (run->exit_reason == KVM_EXIT_IO)
		fprintf(stderr, " (port %#x dir %u size %u)", run->io.port,
			run->io.direction, run->io.size);
	if (run->exit_reason == KVM_EXIT_MMIO)
		fprintf(stderr, " (addr %#llx)",
			(unsigned long long)run->mmio.phys_addr);
	if (run->exit_reason == KVM_EXIT_FAIL_ENTRY)
		fprintf(stderr, " (hw reason %#llx)",
			(unsigned long long)run->fail_entry.hardware_entry_failure_reason);
	fprintf(stderr, "\n");
	exit(1);
}

/* exit_code returns the byte written to the exit port, or -1. */
static int exit_code(struct kvm_run *run)
{
	if (run->exit_reason != KVM_EXIT_IO || run->io.port != EXIT_PORT ||
	    run->io.direction != KVM_EXIT_IO_OUT)
		return -1;
	return ((uint8_t *)run)[run->io.data_offset];
}

/*
 * loop_ns runs a long-mode loop guest for iters iterations and returns the
 * elapsed ns divided by iters. The run loop handles the benchmark exit by
 * doing nothing, exactly like the Go benchmark's no-op device.
 */
static double loop_ns(int kvm, const struct image *img, uint64_t iters, int mmio)
{
	struct vm vm;
	vm_create(&vm, kvm, LONG_RAM);
	setup_long(kvm, &vm, img, iters);
	struct kvm_run *run = vm.run;
	uint64_t exits = 0;
	uint64_t t0 = now_ns();
	for (;;) {
		if (ioctl(vm.cpufd, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			die("KVM_RUN");
		}
		if (!mmio && run->exit_reason == KVM_EXIT_IO &&
		    run->io.port == PIO_PORT) {
			exits++;
			continue;
		}
		if (mmio && run->exit_reason == KVM_EXIT_MMIO &&
		    run->mmio.phys_addr == MMIO_ADDR) {
			exits++;
			continue;
		}
		if (exit_code(run) == 0)
			break;
		bad_exit(run);
	}
	uint64_t t1 = now_ns();
	vm_destroy(&vm);
	if (exits != iters) {
		fprintf(stderr, "kvmbench: %llu exits, want %llu\n",
			(unsigned long long)exits, (unsigned long long)iters);
		exit(1);
	}
	return (double)(t1 - t0) / (double)iters;
}

/* create_ns returns the ns from KVM_CREATE_VM to the first exit, teardown
 * included, averaged over repeats. */
static double create_ns(int kvm, const struct image *img, int repeats)
{
	uint64_t t0 = now_ns();
	for (int i = 0; i < repeats; i++) {
		struct vm vm;
		vm_create(&vm, kvm, CREATE_RAM);
		setup_real(&vm, img);
		while (ioctl(vm.cpufd, KVM_RUN, 0) < 0) {
			if (errno != EINTR)
				die("KVM_RUN");
		}
		if (exit_code(vm.run) != 42)
			bad_exit(vm.run);
		vm_destroy(&vm);
	}
	return (double)(now_ns() - t0) / (double)repeats;
}

static double min_loop(int kvm, const struct image *img, uint64_t iters,
		       int runs, int mmio)
{
	loop_ns(kvm, img, iters / 10 + 1, mmio); /* warm-up */
	double best = 0;
	for (int i = 0; i < runs; i++) {
		double v = loop_ns(kvm, img, iters, mmio);
		if (i == 0 || v < best)
			best = v;
	}
	return best;
}

int main(int argc, char **argv)
{
	uint64_t iters = 100000;
	int repeats = 200, runs = 3;
	const char *pio = NULL, *mmio = NULL, *create = NULL;
	int opt;
	while ((opt = getopt(argc, argv, "n:r:k:p:m:c:")) != -1) {
		switch (opt) {
		case 'n': iters = strtoull(optarg, NULL, 0); break;
		case 'r': repeats = atoi(optarg); break;
		case 'k': runs = atoi(optarg); break;
		case 'p': pio = optarg; break;
		case 'm': mmio = optarg; break;
		case 'c': create = optarg; break;
		default:
			fprintf(stderr, "usage: %s [-n iters] [-r repeats] [-k runs] "
				"[-p pioloop.bin] [-m mmioloop.bin] [-c exit42_16.bin]\n",
				argv[0]);
			return 2;
		}
	}
	if (iters == 0 || repeats <= 0 || runs <= 0) {
		fprintf(stderr, "kvmbench: -n, -r and -k must be positive\n");
		return 2;
	}
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
	if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
		fail("%s", "unexpected KVM API version");

	if (pio) {
		struct image img = read_image(pio, LONG_RAM - LONG_LOAD);
		printf("pio_exit_ns %.1f\n", min_loop(kvm, &img, iters, runs, 0));
		fflush(stdout);
		free(img.data);
	}
	if (mmio) {
		struct image img = read_image(mmio, LONG_RAM - LONG_LOAD);
		printf("mmio_exit_ns %.1f\n", min_loop(kvm, &img, iters, runs, 1));
		fflush(stdout);
		free(img.data);
	}
	if (create) {
		struct image img = read_image(create, 0x80000 - REAL_LOAD);
		create_ns(kvm, &img, repeats / 10 + 1); /* warm-up */
		double best = 0;
		for (int i = 0; i < runs; i++) {
			double v = create_ns(kvm, &img, repeats);
			if (i == 0 || v < best)
				best = v;
		}
		printf("create_to_first_exit_ns %.1f\n", best);
		free(img.data);
	}
	close(kvm);
	return 0;
}
