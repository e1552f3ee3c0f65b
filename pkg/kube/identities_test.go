package kube

import (
	"fmt"
	"net/netip"
	"runtime"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
)

// BenchmarkPodIdentitiesMemory measures what PodIdentities holds per pod:
// the trimmed object in the store and its index entries, for pods of 50
// service accounts per namespace spread over 100 nodes (the heap after, less
// before, over the number of pods; run with -benchtime=1x).
func BenchmarkPodIdentitiesMemory(b *testing.B) {
	const n = 50000
	pods := make([]*corev1.Pod, n)
	for i := range pods {
		a := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		pods[i] = &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: fmt.Sprintf("team-%03d", i%200), Name: fmt.Sprintf("app-%d-7f9c6d5b4-x2k9p", i),
				UID: types.UID(fmt.Sprintf("6f1c2f9e-0b8a-4c1e-9d3a-%012d", i)), ResourceVersion: fmt.Sprint(1000000 + i),
				Labels: map[string]string{"app": "app", "pod-template-hash": "7f9c6d5b4"}},
			Spec: corev1.PodSpec{NodeName: fmt.Sprintf("node-%03d", i%100), ServiceAccountName: fmt.Sprintf("sa-%d", i%50),
				Containers: []corev1.Container{{Name: "app", Image: "registry.example/app:1.2.3"}}},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: a.String(), PodIPs: []corev1.PodIP{{IP: a.String()}}},
		}
	}
	for b.Loop() {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		idx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, podIdentityIndexers())
		for _, p := range pods {
			obj, _ := toPodIdentity(p)
			if err := idx.Add(obj); err != nil {
				b.Fatal(err)
			}
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/n, "B/pod")
		runtime.KeepAlive(idx)
	}
}
