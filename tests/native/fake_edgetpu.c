/* A stand-in for libedgetpu.so.1, for tests on machines without an Edge TPU.
 *
 * It implements the external-delegate plugin interface that load_delegate uses
 * (tflite_plugin_create_delegate / tflite_plugin_destroy_delegate). It appends the
 * options it was given to $FAKE_EDGETPU_LOG, then either reports "no device"
 * (returns NULL, as libedgetpu does when no TPU answers) or, when
 * $FAKE_EDGETPU_PRESENT is 1, returns a delegate that claims no operators, so the
 * model runs on the CPU kernels behind a delegate that loaded.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct FakeDelegate {
  void* data_;
  int (*Prepare)(void* context, struct FakeDelegate* delegate);
  void* CopyFromBufferHandle;
  void* CopyToBufferHandle;
  void* FreeBufferHandle;
  int64_t flags;
  void* opaque_delegate_builder;
} FakeDelegate;

static int prepare(void* context, FakeDelegate* delegate) { return 0; }

FakeDelegate* tflite_plugin_create_delegate(char** keys, char** values, size_t count,
                                            void (*report_error)(const char*)) {
  const char* log = getenv("FAKE_EDGETPU_LOG");
  if (log) {
    FILE* f = fopen(log, "a");
    if (f) {
      fprintf(f, "create");
      for (size_t i = 0; i < count; i++) fprintf(f, " %s=%s", keys[i], values[i]);
      fprintf(f, "\n");
      fclose(f);
    }
  }
  const char* present = getenv("FAKE_EDGETPU_PRESENT");
  if (!present || strcmp(present, "1") != 0) {
    if (report_error) report_error("Failed to open device");
    return NULL;
  }
  FakeDelegate* d = calloc(1, sizeof(FakeDelegate));
  d->Prepare = prepare;
  return d;
}

void tflite_plugin_destroy_delegate(FakeDelegate* d) { free(d); }
