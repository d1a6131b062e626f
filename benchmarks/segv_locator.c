// LD_PRELOAD helper: on SIGSEGV print the faulting instruction's library and symbol, then die as before.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>

static void describe(const char* what, void* address) {
  Dl_info info;
  memset(&info, 0, sizeof info);
  if (dladdr(address, &info) && info.dli_fname) {
    fprintf(stderr, "segv_locator: %s %p in %s (%s+%#lx)\n", what, address, info.dli_fname,
            info.dli_sname ? info.dli_sname : "?",
            (unsigned long)((char*)address - (char*)(info.dli_saddr ? info.dli_saddr : info.dli_fbase)));
  } else {
    fprintf(stderr, "segv_locator: %s %p in no loaded object\n", what, address);
  }
}

static void on_segv(int sig, siginfo_t* si, void* context) {
  ucontext_t* uc = (ucontext_t*)context;
  void* pc = (void*)uc->uc_mcontext.gregs[REG_RIP];
  fprintf(stderr, "segv_locator: signal %d, fault address %p\n", sig, si->si_addr);
  describe("pc", pc);
  // return addresses found on the stack near the fault (a heuristic: words that point into code)
  void** sp = (void**)uc->uc_mcontext.gregs[REG_RSP];
  int shown = 0;
  for (int i = 0; i < 256 && shown < 16; ++i) {
    Dl_info info;
    if (dladdr(sp[i], &info) && info.dli_sname) {
      describe("stack", sp[i]);
      ++shown;
    }
  }
  fflush(stderr);
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_sigaction = on_segv;
  action.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &action, NULL);
}
