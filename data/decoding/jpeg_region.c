/* Decode only a box of a JPEG, optionally at 1/2, 1/4 or 1/8 scale in the DCT, with libjpeg-turbo's libjpeg API:
 * the loader's random-resized crop keeps on average about half of an image, and the rows below the box and the
 * columns beside it need no inverse DCT, upsampling or colour conversion (rows above it are still entropy-decoded).
 * Loaded by data/jpeg_region.py through ctypes; `make setup` builds it:
 *     cc -O2 -shared -fPIC -o data/_jpeg_region.so data/jpeg_region.c -ljpeg
 * Needs libjpeg-turbo >= 1.5 (jpeg_crop_scanline, jpeg_skip_scanlines, greyscale -> RGB output).
 * Reentrant: all state lives in the call's own jpeg_decompress_struct.
 */
#include <stdio.h>
#include <string.h>
#include <setjmp.h>
#include <jpeglib.h>
#include <jerror.h>

typedef struct {
  struct jpeg_error_mgr pub;
  jmp_buf jb;
  char *msg;
  int msglen;
} rd_err;

static void rd_error_exit(j_common_ptr cinfo) {
  rd_err *e = (rd_err *)cinfo->err;
  if (e->msg && e->msglen > 0) {
    char buf[JMSG_LENGTH_MAX];
    (*cinfo->err->format_message)(cinfo, buf);
    snprintf(e->msg, e->msglen, "%s", buf);
  }
  longjmp(e->jb, 1);
}

/* Warnings that leave the pixels as the file's encoder made them: metadata libjpeg does not know (a JFIF revision,
 * an Adobe transform code), SOS parameters odd for a sequential file, and bytes skipped between segments (padding
 * before a marker, after a scan whose data was whole). (A bad ICC marker is reported only to jpeg_read_icc_profile,
 * never called here.) Every other warning means the entropy-coded data is missing or garbled (premature end of file,
 * a marker met mid-scan, a bad Huffman or arithmetic code, a lost restart, scans out of order): libjpeg would then
 * fill the image's remaining rows, up to the size the header claims, with made-up blocks, so such a warning stops the
 * decode at once, as an error. Unknown codes count as corrupt. */
static int rd_harmless(int code) {
  return code == JWRN_JFIF_MAJOR || code == JWRN_ADOBE_XFORM || code == JWRN_NOT_SEQUENTIAL ||
         code == JWRN_EXTRANEOUS_DATA;
}

static void rd_emit_message(j_common_ptr cinfo, int level) {
  /* level < 0: a warning; a harmless one is counted, a corrupt-data one ends the decode as error_exit does */
  if (level < 0) {
    cinfo->err->num_warnings++;
    if (!rd_harmless(cinfo->err->msg_code)) rd_error_exit(cinfo);
  }
}

/* Header only. info: [0]=width [1]=height [2]=num_components [3]=jpeg_color_space [4]=progressive
 * Returns 0, or -1 on error (message in err). */
int rd_header(const unsigned char *buf, unsigned long len, int *info, char *err, int errlen) {
  struct jpeg_decompress_struct cinfo;
  rd_err jerr;
  cinfo.err = jpeg_std_error(&jerr.pub);
  jerr.pub.error_exit = rd_error_exit;
  jerr.pub.emit_message = rd_emit_message;
  jerr.msg = err; jerr.msglen = errlen;
  if (err && errlen > 0) err[0] = 0;
  if (setjmp(jerr.jb)) { jpeg_destroy_decompress(&cinfo); return -1; }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, buf, len);
  jpeg_read_header(&cinfo, TRUE);
  info[0] = cinfo.image_width; info[1] = cinfo.image_height; info[2] = cinfo.num_components;
  info[3] = cinfo.jpeg_color_space; info[4] = cinfo.progressive_mode;
  jpeg_destroy_decompress(&cinfo);
  return 0;
}

static long lround_div(long a, long b) { return (2 * a + b) / (2 * b); } /* round(a/b), a,b >= 0 */

/* Decode the box (top, left, height, width), given in full-resolution pixels, at scale num/8, into out (HWC RGB).
 *
 * min_side: 0 decodes at full scale; else the smallest of 1/8, 2/8, 4/8 (libjpeg-turbo's SIMD reduced IDCTs; its
 *   other M/8 scales are slower than full scale) at which the box is still >= min_side pixels on both sides.
 * The box maps to [round(left*num/8), round((left+width)*num/8)) (same for rows) in the scaled image,
 * clamped to it; out receives exactly that, out_h x out_w x 3, rows packed.
 * info (out): [0]=out_h [1]=out_w [2]=scale_num [3]=scaled image width [4]=scaled image height
 *   [5]=x offset returned by jpeg_crop_scanline [6]=width returned by it [7]=harmless warnings (rd_harmless)
 *   [8]=jpeg_color_space [9]=progressive
 * Returns 0; -1 libjpeg error or corrupt data (message in err); -2 out_cap too small (info[0..1] tell the size needed);
 *   -3 bad box; -4 unsupported colour space.
 * Greyscale comes out as RGB (libjpeg-turbo's GRAYSCALE->RGB); CMYK/YCCK are decoded to CMYK and converted
 * as torchvision/PIL do for Adobe (inverted) CMYK: R = C*K/255 etc.
 */
int rd_decode(const unsigned char *buf, unsigned long len, int top, int left, int height, int width,
              int min_side,
              unsigned char *out, long out_cap, int *info, char *err, int errlen) {
  struct jpeg_decompress_struct cinfo;
  rd_err jerr;
  int i;
  for (i = 0; i < 10; i++) info[i] = 0;
  cinfo.err = jpeg_std_error(&jerr.pub);
  jerr.pub.error_exit = rd_error_exit;
  jerr.pub.emit_message = rd_emit_message;
  jerr.msg = err; jerr.msglen = errlen;
  if (err && errlen > 0) err[0] = 0;
  if (setjmp(jerr.jb)) {
    info[7] = jerr.pub.num_warnings;
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, buf, len);
  jpeg_read_header(&cinfo, TRUE);
  info[8] = cinfo.jpeg_color_space; info[9] = cinfo.progressive_mode;
  long W = cinfo.image_width, H = cinfo.image_height;
  if (width <= 0 || height <= 0 || left < 0 || top < 0 || left + (long)width > W || top + (long)height > H) {
    if (err && errlen > 0) snprintf(err, errlen, "box %d,%d %dx%d outside %ldx%ld image", left, top, width, height, W, H);
    jpeg_destroy_decompress(&cinfo);
    return -3;
  }
  int cmyk = 0;
  switch (cinfo.jpeg_color_space) {
    case JCS_GRAYSCALE: case JCS_YCbCr: case JCS_RGB: cinfo.out_color_space = JCS_RGB; break;
    case JCS_CMYK: case JCS_YCCK: cinfo.out_color_space = JCS_CMYK; cmyk = 1; break;
    default:
      if (err && errlen > 0) snprintf(err, errlen, "unsupported JPEG colour space %d", cinfo.jpeg_color_space);
      jpeg_destroy_decompress(&cinfo);
      return -4;
  }
  int num = 8;
  for (int n = 1; min_side > 0 && n < 8; n *= 2) {
    if ((long)width * n >= 8L * min_side && (long)height * n >= 8L * min_side) { num = n; break; }
  }
  cinfo.scale_num = num; cinfo.scale_denom = 8;
  jpeg_calc_output_dimensions(&cinfo);
  long sw = cinfo.output_width, sh = cinfo.output_height;
  long x0 = lround_div((long)left * num, 8), x1 = lround_div((long)(left + width) * num, 8);
  long y0 = lround_div((long)top * num, 8), y1 = lround_div((long)(top + height) * num, 8);
  if (x1 > sw) x1 = sw;
  if (y1 > sh) y1 = sh;
  if (x0 >= x1) x0 = x1 - 1;
  if (y0 >= y1) y0 = y1 - 1;
  long ow = x1 - x0, oh = y1 - y0;
  info[0] = (int)oh; info[1] = (int)ow; info[2] = num; info[3] = (int)sw; info[4] = (int)sh;
  if (oh * ow * 3 > out_cap) { jpeg_destroy_decompress(&cinfo); return -2; }

  jpeg_start_decompress(&cinfo);
  /* jpeg_crop_scanline moves the left edge down to an iMCU boundary but keeps the right edge where asked; there
   * the chroma upsampler (fancy, triangle filter) replicates the edge instead of reading the next chroma sample,
   * so the last column would differ from a full decode by a few levels. Ask for one iMCU more on the right. */
#if JPEG_LIB_VERSION >= 70
  long imcu_w = (long)cinfo.max_h_samp_factor * cinfo.min_DCT_h_scaled_size;
#else
  long imcu_w = (long)cinfo.max_h_samp_factor * cinfo.min_DCT_scaled_size;
#endif
  /* Same on the left when x0 is already on an iMCU boundary: start one pixel earlier (-> the previous iMCU). */
  long want_x = x0 > 0 ? x0 - 1 : 0;
  long want_w = x0 + ow + imcu_w - want_x;
  if (want_x + want_w > sw) want_w = sw - want_x;
  JDIMENSION cx = (JDIMENSION)want_x, cw = (JDIMENSION)want_w;
  if (!(want_x == 0 && want_w == sw))          /* a full-width crop is a no-op; skip the call */
    jpeg_crop_scanline(&cinfo, &cx, &cw);  /* left edge down to an iMCU boundary; output_width becomes cw */
  info[5] = (int)cx; info[6] = (int)cw;
  long dx = x0 - (long)cx;                 /* our box's first column within the widened row */
  int ncomp = cinfo.output_components;     /* 3, or 4 for CMYK */
#define RD_ROWS 16  /* rows per jpeg_read_scanlines call: one row per call costs ~15% on a full decode */
  JSAMPARRAY rows = (*cinfo.mem->alloc_sarray)((j_common_ptr)&cinfo, JPOOL_IMAGE, cinfo.output_width * ncomp, RD_ROWS);
  if (y0 > 0) {
    JDIMENSION skipped = jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0);
    (void)skipped;
  }
  long y = 0;
  while (y < oh) {
    long want = oh - y < RD_ROWS ? oh - y : RD_ROWS;
    JDIMENSION got;
    if (!cmyk && dx == 0 && (long)cinfo.output_width == ow) {
      /* rows are exactly the box's width: decode straight into out */
      JSAMPROW direct[RD_ROWS];
      for (long r = 0; r < want; r++) direct[r] = out + (y + r) * ow * 3;
      got = jpeg_read_scanlines(&cinfo, direct, (JDIMENSION)want);
    } else {
      got = jpeg_read_scanlines(&cinfo, rows, (JDIMENSION)want);
      for (JDIMENSION r = 0; r < got; r++) {
        unsigned char *dst = out + (y + r) * ow * 3;
        if (!cmyk) {
          memcpy(dst, rows[r] + dx * 3, ow * 3);
        } else {
          const unsigned char *s = rows[r] + dx * 4;
          for (long x = 0; x < ow; x++, s += 4, dst += 3) {
            int k = s[3];
            dst[0] = (unsigned char)((s[0] * k + 127) / 255);
            dst[1] = (unsigned char)((s[1] * k + 127) / 255);
            dst[2] = (unsigned char)((s[2] * k + 127) / 255);
          }
        }
      }
    }
    if (got == 0) {
      if (err && errlen > 0) snprintf(err, errlen, "read_scanlines returned no row at %ld", y0 + y);
      jpeg_destroy_decompress(&cinfo);
      return -1;
    }
    y += got;
  }
  info[7] = jerr.pub.num_warnings;
  jpeg_abort_decompress(&cinfo);   /* rows below the box are never decoded */
  jpeg_destroy_decompress(&cinfo);
  return 0;
}
